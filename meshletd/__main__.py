"""`meshletd`: the meshlet daemon (run by systemd as `Type=notify`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from meshletd import __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshletd", description=__doc__)
    p.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("MESHLET_CONFIG", "/etc/meshlet/meshlet.toml")),
        help="configuration file (default: /etc/meshlet/meshlet.toml)",
    )
    p.add_argument(
        "--credentials",
        type=Path,
        default=Path(os.environ.get("MESHLET_CREDENTIALS", "/etc/meshlet/credentials.toml")),
        help="root-only credentials file, used when $CREDENTIALS_DIRECTORY is not set",
    )
    p.add_argument(
        "--check", action="store_true", help="validate the configuration and credentials, then exit"
    )
    p.add_argument("--version", action="version", version=f"meshletd {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The imports below are made here, not at the top, for two reasons: `--version` and
    # `--help` answer without loading the daemon, and `skip_optional_imports` must run
    # before anything imports httpx (it keeps httpx's CLI out of the resident set).
    from meshletd.daemon.lean import skip_optional_imports

    skip_optional_imports()
    from meshletd import config
    from meshletd.daemon import log
    from meshletd.errors import MeshletError

    try:
        cfg = config.load(args.config)
        creds = config.load_credentials(fallback=args.credentials)
    except MeshletError as e:
        print(f"meshletd: {e.message}", file=sys.stderr)
        return e.exit_code
    if args.check:
        print(f"meshletd: {args.config} is valid ({len(cfg.members)} member(s))")
        return 0
    log.setup(cfg.log_level)

    import trio

    from meshletd.daemon.service import Daemon

    try:
        daemon = Daemon(cfg, creds, config_path=args.config)
        trio.run(daemon.run)
    except MeshletError as e:
        print(f"meshletd: {e.message}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"meshletd: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
