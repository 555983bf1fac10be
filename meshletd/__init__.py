"""meshletd: the meshlet daemon (pure core, adapters and the daemon's main)."""

__version__ = "0.1.0"
