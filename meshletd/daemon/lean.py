"""Keep the daemon's idle memory small: skip optional imports nothing in meshletd uses.

meshletd idles for days on machines whose owners lend them; every resident MB counts
(`dev/bench footprint`, goal <= 60 MB). Call `skip_optional_imports()` first thing in the
daemon process, before anything imports the libraries named here.
"""

from __future__ import annotations

import sys

# httpx's package __init__ imports `httpx._main` (its command-line client) whenever click,
# rich and pygments are installed, which they are for meshletctl: ~100 modules and ~5 MB
# resident in a process that never runs that CLI. Marking the module absent makes httpx take
# its documented fallback (an `httpx.main` that asks for `pip install httpx[cli]`).
_OPTIONAL = ("httpx._main",)


def skip_optional_imports() -> None:
    """Make the optional modules above unimportable in this process (no effect on modules
    already imported)."""
    for name in _OPTIONAL:
        package = name.rsplit(".", 1)[0]
        if package not in sys.modules:
            sys.modules.setdefault(name, None)  # type: ignore[arg-type]
