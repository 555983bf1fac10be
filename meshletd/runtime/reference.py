"""Image references, split the way podman reads them (pure; no I/O).

`registry[:port]/path[:tag][@digest]`: the first component is a registry when it holds a
"." or a ":" or is "localhost" (the distribution spec's rule); without one the image is
Docker Hub's (`docker.io`, `library/` for a single component). `localhost/NAME` with no
port is podman's namespace for images built or imported on the machine: it lives in no
registry, so it is never resolved or pulled (docs/protocol.md, section 24).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshletd.atproto.validity import IMAGE_DIGEST_RE as DIGEST_RE
from meshletd.atproto.validity import image_problem

DOCKER_HUB = "docker.io"


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One image reference: where it lives, which repository, which tag and digest."""

    registry: str  # "docker.io", "registry.example:5000", or "localhost" (local only)
    repository: str  # the path inside the registry ("library/nginx")
    tag: str | None = None
    digest: str | None = None

    @property
    def local_only(self) -> bool:
        """Podman's local namespace (`localhost/NAME`): built or imported here, never pulled."""
        return self.registry == "localhost"

    @property
    def name(self) -> str:
        """registry/repository, as podman names it."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What a registry's manifest endpoint takes: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def pinned(self, digest: str) -> str:
        """The reference by digest only (`name@sha256:...`): exactly these bits, whatever
        the tag means later. Podman does not accept a tag and a digest together."""
        return f"{self.name}@{digest}"

    def __str__(self) -> str:
        out = self.name
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out


def parse_image(image: str) -> ImageRef:
    """Split a reference the lexicon admits (`image_problem` is None); ValueError otherwise."""
    if (why := image_problem(image)) is not None:
        raise ValueError(f"image {image!r} {why}")
    rest, _, digest = image.partition("@")
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
    else:
        registry, path = DOCKER_HUB, rest
    tag: str | None = None
    last_slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > last_slash:
        path, tag = path[:colon], path[colon + 1 :]
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return ImageRef(registry, path, tag, digest or None)


def pinned_image(image: str, digest: str | None) -> str:
    """The reference a replica runs: `image` pinned to `digest` when the workload records
    one (resolved when the owner published it), else `image` as written."""
    if not digest:
        return image
    if not DIGEST_RE.match(digest):
        raise ValueError(f"image digest {digest!r} is not sha256:<64 hex digits>")
    return parse_image(image).pinned(digest)
