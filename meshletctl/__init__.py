"""meshletctl: the command-line client of the local meshletd."""
