"""The daemon type-checks under `mypy --strict` (the pin in pyproject.toml): its parts talk
through typed Protocols, so a change that breaks a seam fails here, not on a host."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_the_daemon_is_mypy_strict_clean() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            # Only the daemon's own errors: the modules it imports are checked for the types
            # they give it, not reported on.
            "--follow-imports=silent",
            "meshletd/daemon",
            "meshletd/__main__.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_daemon_s_interfaces_name_their_types_not_any() -> None:
    # Every Protocol a part of the daemon offers the others: JSON is `JsonObject`
    # (meshletd/jsonvalue.py), stored values are `object` a reader narrows, never `Any`.
    import ast

    loose = []
    for path in sorted((ROOT / "meshletd" / "daemon").glob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and any(
                getattr(b, "id", None) == "Protocol" for b in node.bases
            ):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Name) and sub.id == "Any":
                        loose.append(f"{path.name}:{sub.lineno} {node.name}")
    assert loose == []
