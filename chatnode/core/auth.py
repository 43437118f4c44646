"""Passwords (scrypt, stdlib) and tokens (JWT HS256, PyJWT). CPU-bound: callers run
``hash_password``/``verify_password`` off the event loop.

Tokens are checked on every REST call and join, in two steps: :class:`TokenVerifier` checks
the signature and expiry (and remembers the claims of tokens it verified, so a client that
reuses its token pays PyJWT's decode and HMAC once); :class:`UserChecks` then decides whether
the token's user may still act -- the one place where what ends a token early is decided.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections import OrderedDict

import attrs
import jwt

from chatnode.core.errors import Unauthorized

_SCRYPT_R = 8
_SCRYPT_P = 1


def hash_password(password: str, *, cost_log2: int = 14) -> str:
    """``scrypt$<log2 n>$<salt b64>$<hash b64>``."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=1 << cost_log2, r=_SCRYPT_R, p=_SCRYPT_P, maxmem=1 << 26
    )
    return "$".join(
        [
            "scrypt",
            str(cost_log2),
            base64.b64encode(salt).decode(),
            base64.b64encode(digest).decode(),
        ]
    )


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, cost, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64)
        expected = base64.b64decode(digest_b64)
        digest = hashlib.scrypt(
            password.encode(), salt=salt, n=1 << int(cost), r=_SCRYPT_R, p=_SCRYPT_P, maxmem=1 << 26
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


@attrs.frozen
class Claims:
    user: str
    is_admin: bool
    expires_at_s: int
    issued_at_s: int = 0  # a token without ``iat`` counts as older than anything


def issue_token(user: str, *, is_admin: bool, secret: str, now_s: int, ttl_s: int) -> str:
    payload = {"sub": user, "adm": is_admin, "iat": now_s, "exp": now_s + ttl_s}
    return jwt.encode(payload, secret, algorithm="HS256")


def verify_token(token: str, *, secret: str, now_s: int) -> Claims:
    """Raise ``Unauthorized`` (code ``token_invalid`` or ``token_expired``)."""
    try:
        payload = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            options={"require": ["sub", "exp"], "verify_exp": False},
        )
    except jwt.PyJWTError:
        raise Unauthorized(
            "token is not valid; get one from POST /v1/tokens", code="token_invalid"
        ) from None
    sub, exp, iat = payload.get("sub"), payload.get("exp"), payload.get("iat", 0)
    if not isinstance(sub, str) or not isinstance(exp, int) or not isinstance(iat, int):
        raise Unauthorized("token is not valid; get one from POST /v1/tokens", code="token_invalid")
    if exp <= now_s:
        raise _expired()
    return Claims(
        user=sub, is_admin=bool(payload.get("adm", False)), expires_at_s=exp, issued_at_s=iat
    )


class TokenVerifier:
    """:func:`verify_token` for one secret, remembering the claims of the ``max_entries`` most
    recently used valid tokens.

    Rules: a remembered token is the exact string that was verified (a changed byte is another
    token, verified anew); expiry is checked on every call, so a remembered token stops working
    at its ``exp`` like any other, and is forgotten then; invalid tokens are never remembered
    (garbage cannot fill the memory). Tokens cannot be revoked one by one: what ends a token
    early is its user's deletion, which :class:`UserChecks` decides apart from the token.
    """

    def __init__(self, secret: str, *, max_entries: int = 10_000) -> None:
        self._secret = secret
        self.max_entries = max_entries
        self._claims: OrderedDict[str, Claims] = OrderedDict()

    def verify(self, token: str, *, now_s: int) -> Claims:
        """Raise ``Unauthorized`` (code ``token_invalid`` or ``token_expired``)."""
        claims = self._claims.get(token)
        if claims is None:
            claims = verify_token(token, secret=self._secret, now_s=now_s)
            self._claims[token] = claims
            if len(self._claims) > self.max_entries:
                self._claims.popitem(last=False)
        elif claims.expires_at_s <= now_s:
            del self._claims[token]
            raise _expired()
        else:
            self._claims.move_to_end(token)
        return claims


def _expired() -> Unauthorized:
    return Unauthorized(
        "token has expired; get a new one from POST /v1/tokens", code="token_expired"
    )


class UserChecks:
    """Whether the user of a verified token may act: what this node knows about token users,
    and the rules that decide from it. The node asks the directory and reports each answer
    here (``found``, ``not_found``, ``users_deleted``, ``learned_users_deleted``); nothing here
    does I/O.

    Rules:

    1. **The directory decides when it answers.** A user it found is trusted for
       ``trust_s`` (seconds of the node's clock): checks in that time need no directory query,
       so a REST call with a known token costs none; a deletion made on another node shows
       within that time. A user it did not find is refused.
    2. **When the directory cannot answer** (MySQL down), a token is accepted unless its user
       is known deleted: the token was issued no later than (a) a lookup of its user name that
       found nobody, or (b) a deletion of every user (``DELETE /v1/users``) that this node
       made or learned. A token issued later belongs to an account created after it. Tokens
       carry their issue time in whole seconds: a token of the same second as the deletion
       counts as older (refused: the safe side). Passwords and new tokens still need the
       directory.
    3. **What is known only grows**, within bounds: the time of the latest deletion only moves
       forward (a deletion made here, or a later one learned, drops every trusted user); names
       found absent are kept, the ``max_names`` most recent of them.

    Today users end only all at once (``DELETE /v1/users``), so (b) covers every deletion made
    through the API; the node shares it through ``ports.Revocations`` (Redis in a cluster), so
    that a node learns of another node's deletion during an outage. Revocation lists of tokens
    or accounts belong here as further ``known_deleted`` reasons.
    """

    def __init__(self, *, trust_s: float, max_names: int = 100_000) -> None:
        self.trust_s = trust_s
        self.max_names = max_names
        self._trusted: dict[str, float] = {}  # name -> trusted until (node clock, s)
        self._absent: OrderedDict[str, int] = OrderedDict()  # name -> found absent at (ms)
        self.users_deleted_at_ms = 0

    def trusted(self, user: str, now: float) -> bool:
        """Rule 1: the directory found ``user`` less than ``trust_s`` ago."""
        return self._trusted.get(user, -1.0) > now

    def found(self, user: str, now: float) -> None:
        """The directory found ``user`` (at ``now``, node clock)."""
        if len(self._trusted) >= self.max_names:
            self._trusted.clear()  # each entry is worth one lookup: cheap to rebuild
        self._trusted[user] = now + self.trust_s

    def not_found(self, user: str, *, at_ms: int) -> None:
        """The directory had no ``user`` at wall time ``at_ms``."""
        self._trusted.pop(user, None)
        self._absent[user] = max(at_ms, self._absent.pop(user, 0))
        while len(self._absent) > self.max_names:
            self._absent.popitem(last=False)

    def users_deleted(self, *, at_ms: int) -> None:
        """This node deleted every user that existed at wall time ``at_ms``."""
        self.users_deleted_at_ms = max(self.users_deleted_at_ms, at_ms)
        self._trusted.clear()

    def learned_users_deleted(self, *, at_ms: int) -> None:
        """Another node (or this one, before) deleted every user that existed at ``at_ms``."""
        if at_ms > self.users_deleted_at_ms:
            self.users_deleted(at_ms=at_ms)

    def known_deleted(self, claims: Claims) -> bool:
        """Rule 2: the token was issued no later than a time its user is known not to exist."""
        absent_ms = max(self._absent.get(claims.user, 0), self.users_deleted_at_ms)
        return absent_ms > 0 and claims.issued_at_s * 1000 <= absent_ms
