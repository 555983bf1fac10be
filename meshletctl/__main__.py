"""Entry point for `meshletctl` (filled in by the daemon issue)."""

import sys

from meshletd import __version__


def main() -> int:
    if sys.argv[1:] == ["version"]:
        print(__version__)
        return 0
    print("meshletctl: only `version` exists yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
