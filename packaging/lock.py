"""Print the pinned closure of meshlet's runtime dependencies, as installed in this venv.

`dev/package lock` writes it to packaging/requirements.lock: the bundle in the packages is
built from that file alone, so a rebuild months later installs the same versions.
"""

from __future__ import annotations

import importlib.metadata as md
import re

from packaging.requirements import Requirement


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = "meshlet") -> dict[str, str]:
    """Every distribution `root` needs at run time (no extras), name -> installed version."""
    found: dict[str, str] = {}

    def walk(requirements: list[str] | None) -> None:
        for text in requirements or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            if _key(req.name) in found:
                continue
            dist = md.distribution(req.name)
            found[_key(req.name)] = dist.version
            walk(dist.requires)

    walk(md.distribution(root).requires)
    return dict(sorted(found.items()))


if __name__ == "__main__":
    print("# Runtime dependencies bundled into /usr/lib/meshlet (the whole closure, pinned).")
    print("# Regenerate after a change of pyproject's dependencies: dev/package lock")
    for name, version in closure().items():
        print(f"{name}=={version}")
