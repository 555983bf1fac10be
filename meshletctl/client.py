"""A tiny synchronous XRPC client for the control socket (stdlib only: fast to import).

Errors come back as `MeshletError`s rebuilt from the XRPC `error` name, so the CLI can map
them to exit codes. A socket that is absent or refuses connections means the daemon is not
running (`DaemonUnavailable`); a socket we may not open means missing group membership
(`Forbidden`).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any
from urllib.parse import urlencode

from meshletd.errors import DaemonUnavailable, Forbidden, InternalError, MeshletError, from_xrpc

DEFAULT_SOCKET = "/run/meshlet/control.sock"


def socket_path() -> str:
    return os.environ.get("MESHLET_SOCKET", DEFAULT_SOCKET)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ControlClient:
    """Calls `farm.meshlet.*` methods on the local meshletd."""

    def __init__(self, path: str | None = None, timeout: float = 30.0) -> None:
        self.path = path or socket_path()
        self.timeout = timeout
        self._conn: _UnixConnection | None = None

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
        target = f"/xrpc/{nsid}" + (f"?{urlencode(clean, doseq=True)}" if clean else "")
        return self._call("GET", target, None)

    def procedure(self, nsid: str, body: dict[str, Any] | None = None) -> Any:
        return self._call("POST", f"/xrpc/{nsid}", json.dumps(body or {}).encode())

    def _call(self, method: str, target: str, body: bytes | None) -> Any:
        if self._conn is None:
            self._conn = _UnixConnection(self.path, self.timeout)
        headers = {"content-type": "application/json"} if body is not None else {}
        try:
            self._conn.request(method, target, body=body, headers=headers)
            resp = self._conn.getresponse()
            data = resp.read()
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
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise DaemonUnavailable(f"lost the connection to meshletd: {e}") from None
        try:
            payload = json.loads(data) if data else {}
        except ValueError:
            raise InternalError(f"meshletd sent a non-JSON reply (HTTP {resp.status})") from None
        if resp.status >= 400:
            raise from_xrpc(payload, resp.status)
        return payload


def _param(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


__all__ = ["ControlClient", "MeshletError", "socket_path"]
