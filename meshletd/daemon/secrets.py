"""Workload secrets: kept by the owner's meshlet, handed only to slot holders, sealed.

How a secret travels (`meshletctl run --secret NAME=@FILE`):

1. meshletctl reads the file and stores the value on this (the owner's) meshlet over the
   control socket (`farm.meshlet.putSecret`); the workload record carries only `{name}`.
2. A meshlet that wins a slot asks the owner's meshlet for it with `farm.meshlet.getSecret`,
   authenticated by service auth (iss = the winner's meshlet DID, lxm = getSecret).
3. The owner's meshlet answers only if the workload is its owner's, references that secret,
   and the caller holds one of its slots in the placement it computes itself (the same pure
   function of public records every member computes). The value is sealed (NaCl sealed box)
   to the caller's X25519 key published in its meshletOwner record, so it is unreadable on
   the wire and by anyone but that meshlet, even over plain HTTP.
4. The winner unseals it and hands it to podman as a secret (never in a unit property,
   argv or log).

Why pull rather than sealing secrets into records: records are public and permanent, and
the winners are known only after the bid round; a sealed copy per possible winner would
leak metadata and cost PDS writes. Pulling costs no write and reaches exactly the winners.
"""

from __future__ import annotations

import base64

from nacl.public import PrivateKey, PublicKey, SealedBox

from meshletd.daemon.stored import Store

SECRET_KEY = "secrets"  # state-store key of the owner's secrets (root-only file)
ENCRYPTION_KEY = "encryption-key"  # state-store key of this meshlet's X25519 private key


def seal(public_b64: str, value: bytes) -> bytes:
    """Seal `value` to an X25519 public key (standard base64 of 32 bytes)."""
    return SealedBox(PublicKey(base64.b64decode(public_b64))).encrypt(value)


class EncryptionKey:
    """This meshlet's X25519 key pair, created once and kept in the state store."""

    def __init__(self, store: Store) -> None:
        raw = store.get(ENCRYPTION_KEY)
        private = raw.get("private") if isinstance(raw, dict) else None
        if isinstance(private, str):
            self._private = PrivateKey(base64.b64decode(private))
        else:
            self._private = PrivateKey.generate()
            store.put(ENCRYPTION_KEY, {"private": base64.b64encode(bytes(self._private)).decode()})

    @property
    def public_b64(self) -> str:
        return base64.b64encode(bytes(self._private.public_key)).decode()

    def unseal(self, sealed: bytes) -> bytes:
        return SealedBox(self._private).decrypt(sealed)

    def __repr__(self) -> str:
        return f"EncryptionKey(public={self.public_b64})"


class SecretStore:
    """The owner's secrets on this meshlet: name → value, persisted root-only."""

    def __init__(self, store: Store) -> None:
        self._store = store
        raw = store.get(SECRET_KEY, {})
        items = raw.items() if isinstance(raw, dict) else ()
        self._values = {k: base64.b64decode(v) for k, v in items if isinstance(v, str)}

    def get(self, name: str) -> bytes | None:
        return self._values.get(name)

    def put(self, name: str, value: bytes) -> None:
        self._values[name] = bytes(value)
        self._store.put(
            SECRET_KEY, {k: base64.b64encode(v).decode() for k, v in self._values.items()}
        )

    def names(self) -> list[str]:
        return sorted(self._values)

    def __repr__(self) -> str:
        return f"SecretStore(names={self.names()})"
