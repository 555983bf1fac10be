"""Entry point for `meshletd` (filled in by the daemon issue)."""

import sys


def main() -> int:
    print("meshletd: the daemon is not built yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
