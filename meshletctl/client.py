"""A tiny synchronous XRPC client for the control socket (stdlib only: fast to import).

Errors come back as `MeshletError`s rebuilt from the XRPC `error` name, so the CLI can map
them to exit codes. A socket that is absent or refuses connections means the daemon is not
running (`DaemonUnavailable`); a socket we may not open means missing group membership
(`Forbidden`).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from meshletd.errors import DaemonUnavailable, Forbidden, InternalError, MeshletError, from_xrpc

DEFAULT_SOCKET = "/run/meshlet/control.sock"


def socket_path() -> str:
    return os.environ.get("MESHLET_SOCKET", DEFAULT_SOCKET)


class _ProtocolError(Exception):
    pass


class _Connection:
    """Just enough HTTP/1.1 for our own server (Content-Length bodies, keep-alive).

    Hand-written instead of http.client, whose email-parser imports cost ~35 ms at every
    meshletctl start.
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def request(self, method: str, target: str, body: bytes | None) -> tuple[int, bytes]:
        head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.sock.sendall(head.encode("latin-1") + b"\r\n" + (body or b""))
        while b"\r\n\r\n" not in self._buf:
            self._recv()
        raw_head, _, self._buf = self._buf.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise _ProtocolError(f"bad status line {lines[0]!r}")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        while len(self._buf) < length:
            self._recv()
        data, self._buf = self._buf[:length], self._buf[length:]
        return int(parts[1]), data

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise _ProtocolError("connection closed by meshletd")
        self._buf += chunk


class ControlClient:
    """Calls `farm.meshlet.*` methods on the local meshletd."""

    def __init__(self, path: str | None = None, timeout: float = 30.0) -> None:
        self.path = path or socket_path()
        self.timeout = timeout
        self._conn: _Connection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, nsid: str, **params: Any) -> Any:
        clean = {k: _param(v) for k, v in params.items() if v is not None}
        target = f"/xrpc/{nsid}"
        if clean:
            from urllib.parse import urlencode  # not needed on the `status` fast path

            target += "?" + urlencode(clean, doseq=True)
        return self._call("GET", target, None)

    def procedure(self, nsid: str, body: dict[str, Any] | None = None) -> Any:
        return self._call("POST", f"/xrpc/{nsid}", json.dumps(body or {}).encode())

    def _call(self, method: str, target: str, body: bytes | None) -> Any:
        try:
            if self._conn is None:
                self._conn = _Connection(self.path, self.timeout)
            status, data = self._conn.request(method, target, body)
        except (FileNotFoundError, ConnectionRefusedError):
            self.close()
            raise DaemonUnavailable(
                f"meshletd is not running (no control socket at {self.path}); "
                "start it with: systemctl start meshletd"
            ) from None
        except PermissionError:
            self.close()
            raise Forbidden(
                f"permission denied on {self.path}: join the 'meshlet' group "
                "(usermod -aG meshlet $USER, then log in again) or use sudo"
            ) from None
        except (OSError, _ProtocolError, ValueError) as e:
            self.close()
            raise DaemonUnavailable(f"lost the connection to meshletd: {e}") from None
        try:
            payload = json.loads(data) if data else {}
        except ValueError:
            raise InternalError(f"meshletd sent a non-JSON reply (HTTP {status})") from None
        if status >= 400:
            raise from_xrpc(payload, status)
        return payload


def _param(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


__all__ = ["ControlClient", "MeshletError", "socket_path"]
