"""Service-auth JWTs from peers: who is calling, and may they call this method now.

The atproto SDK's `verify_jwt_async` checks the signature against the issuer's DID
document key, `aud` and `exp`. It does not check `lxm` (the method the token is for), does
not require `exp` or `jti`, and keeps no memory of used tokens. We add those:

- `exp` required, and at most `MAX_LIFETIME` seconds ahead (a leaked long token is a risk);
- `lxm` must equal the NSID being called (a token for `ping` cannot delete a workload);
- `jti` required, and each (iss, jti) accepted once until its `exp` (replay cache);
- `iss` must be a bare DID (no `#service` fragment);
- `iss` must be somebody we know (`is_known`: a member of one of our clusters, or our
  owner), checked BEFORE any DID resolution: a stranger costs no network request, and
  cannot make us fetch a document it points at (docs/protocol.md section 19.5);
- what resolution failed on is logged, never sent back to the caller.

The replay cache is bounded in all and per issuer, so one issuer (even a member) cannot
fill it and lock the others out. Key resolution is behind `SigningKeyResolver` so tests can
use keys they made themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from meshletd.errors import (
    BadJwt,
    BadJwtAudience,
    BadJwtLexiconMethod,
    BadJwtSignature,
    Forbidden,
    JwtExpired,
    JwtReplayed,
)

log = logging.getLogger("meshletd.xrpc.auth")

MAX_LIFETIME = 3600
LEEWAY = 5


class SigningKeyResolver(Protocol):
    async def signing_key(self, did: str, force_refresh: bool) -> str:
        """The issuer's atproto signing key as a `did:key:…` string."""
        ...


MAX_JTI_LENGTH = 256


class ReplayCache:
    """Remembers (iss, jti) pairs until their token expires; bounded in all (`max_entries`)
    and per issuer (`per_issuer`). Expired entries go first; a live one is never forgotten
    (that would allow its replay): an issuer at its share is refused until some of its own
    tokens expire, and nobody else is affected."""

    def __init__(self, max_entries: int = 100_000, per_issuer: int = 4096) -> None:
        self._seen: dict[str, dict[str, float]] = {}  # iss -> jti -> exp
        self._count = 0
        self._max = max_entries
        self._per_issuer = per_issuer

    def __len__(self) -> int:
        return self._count

    def check_and_add(self, iss: str, jti: str, exp: float, now: float) -> bool:
        """True if new (and now remembered); False if this token was already used (or the
        issuer holds its whole share of live tokens)."""
        mine = self._seen.get(iss)
        if mine is not None:
            seen_exp = mine.get(jti)
            if seen_exp is not None and seen_exp > now - LEEWAY:
                return False
            if len(mine) >= self._per_issuer:
                self._purge_issuer(iss, now)
                mine = self._seen.get(iss)
                if mine is not None and len(mine) >= self._per_issuer:
                    return False
        if self._count >= self._max:
            for other in list(self._seen):
                self._purge_issuer(other, now)
            if self._count >= self._max:
                return False
        mine = self._seen.setdefault(iss, {})
        if jti not in mine:
            self._count += 1
        mine[jti] = exp
        return True

    def _purge_issuer(self, iss: str, now: float) -> None:
        cutoff = now - LEEWAY
        mine = self._seen[iss]
        live = {j: e for j, e in mine.items() if e > cutoff}
        self._count -= len(mine) - len(live)
        if live:
            self._seen[iss] = live
        else:
            del self._seen[iss]


class ServiceAuthVerifier:
    """Verifies `Authorization: Bearer <service JWT>` for this meshlet's DID."""

    def __init__(
        self,
        own_did: str,
        resolver: SigningKeyResolver,
        *,
        clock: Callable[[], float] = time.time,
        replay_cache: ReplayCache | None = None,
        is_known: Callable[[str], bool] | None = None,
    ) -> None:
        self.own_did = own_did
        self._resolver = resolver
        self._clock = clock
        self._replay = replay_cache or ReplayCache()
        # Who may be resolved at all (members of our clusters, our owner). None: anyone
        # (tests of the token checks alone).
        self.is_known = is_known

    async def verify(self, token: str, nsid: str) -> str:
        """The verified issuer DID, or raise a `BadJwt…`/`JwtExpired`/`JwtReplayed` error."""
        from atproto_server.auth import jwt as sdk_jwt
        from atproto_server.exceptions import (
            TokenDecodeError,
            TokenExpiredSignatureError,
            TokenImmatureSignatureError,
            TokenInvalidAudienceError,
            TokenInvalidIssuedAtError,
            TokenInvalidSignatureError,
        )

        # Claims first (cheap, no network): refuse before resolving any DID.
        try:
            payload = sdk_jwt.get_jwt_payload(token)
        except TokenDecodeError as e:
            raise BadJwt(f"malformed token: {e}") from None
        now = self._clock()
        if payload.exp is None:
            raise BadJwt("token has no exp")
        if payload.exp <= now - LEEWAY:
            raise JwtExpired("token has expired")
        if payload.exp > now + MAX_LIFETIME + LEEWAY:
            raise BadJwt(f"token lives longer than {MAX_LIFETIME} s")
        if payload.aud != self.own_did:
            raise BadJwtAudience(f"token is for {payload.aud!r}, not this meshlet")
        lxm = (payload.model_extra or {}).get("lxm")
        if lxm != nsid:
            raise BadJwtLexiconMethod(f"token is for method {lxm!r}, not {nsid}")
        if not payload.jti:
            raise BadJwt("token has no jti")
        if not isinstance(payload.jti, str) or len(payload.jti) > MAX_JTI_LENGTH:
            raise BadJwt(f"token jti must be a string of at most {MAX_JTI_LENGTH} characters")
        iss = payload.iss
        if not iss or not iss.startswith("did:") or "#" in iss or len(iss) > 2048:
            raise BadJwt("token iss must be a DID")
        if self.is_known is not None and not self.is_known(iss):
            # Before any resolution: a stranger costs no request and learns nothing.
            raise Forbidden("the token's issuer is not a member of this meshlet's clusters")

        async def get_key(did: str, force_refresh: bool) -> str:
            try:
                return await self._resolver.signing_key(did, force_refresh)
            except Exception as e:
                raise _Unresolvable(str(e)) from e

        try:
            # The SDK checks exp against the wall clock itself; our own (injectable) clock
            # has already decided expiry above, so give it the same leeway.
            await sdk_jwt.verify_jwt_async(token, get_key, own_did=self.own_did, leeway=LEEWAY)
        except _Unresolvable as e:
            # The detail (an address, an HTTP error) is for the operator, not the caller.
            log.warning("service auth: cannot resolve the signing key of %s: %s", iss, e)
            raise BadJwt("cannot resolve the signing key of the token's issuer") from None
        except TokenExpiredSignatureError:
            raise JwtExpired("token has expired") from None
        except TokenInvalidAudienceError:
            raise BadJwtAudience("token is not for this meshlet") from None
        except TokenInvalidSignatureError:
            raise BadJwtSignature(f"signature does not match the key of {iss}") from None
        except (TokenImmatureSignatureError, TokenInvalidIssuedAtError) as e:
            raise BadJwt(f"token not valid yet: {e}") from None
        except TokenDecodeError as e:
            raise BadJwt(f"malformed token: {e}") from None
        # Only a verified token may consume its jti (else anyone could burn others' jtis).
        if not self._replay.check_and_add(iss, payload.jti, float(payload.exp), now):
            raise JwtReplayed("token was already used")
        return str(iss)


class _Unresolvable(Exception):
    pass


class IdentityKeys:
    """`SigningKeyResolver` over the atproto layer's DID resolver (did:plc, did:web).

    The resolver is created on the first verification. (The first verification also imports
    the SDK's JWT code and, with it, `cryptography`: ~9 MB that a daemon no peer has called
    with a token does not carry.)
    """

    def __init__(self, plc_url: str, resolver: Any = None) -> None:
        self._plc_url = plc_url
        self._resolver = resolver

    async def signing_key(self, did: str, force_refresh: bool) -> str:
        if self._resolver is None:
            from meshletd.atproto.identity import IdentityResolver

            self._resolver = IdentityResolver(self._plc_url)
        ident = await self._resolver.resolve(did, fresh=force_refresh)
        if not ident.signing_key:
            raise LookupError(f"{did} has no atproto signing key")
        return str(ident.signing_key)


class StaticKeys:
    """`SigningKeyResolver` from a fixed DID → did:key map (tests, and pinned peers)."""

    def __init__(self, keys: dict[str, str] | None = None) -> None:
        self.keys = dict(keys or {})
        self.lookups = 0

    async def signing_key(self, did: str, force_refresh: bool) -> str:
        self.lookups += 1
        try:
            return self.keys[did]
        except KeyError:
            raise LookupError(f"unknown DID {did}") from None
