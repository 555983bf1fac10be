"""meshletd's daemon: lifecycle, the API methods, and the node they talk to."""
