"""The appview: meshletd's read-only web page of the commune and its /metrics."""
