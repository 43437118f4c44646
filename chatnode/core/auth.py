"""Passwords (scrypt, stdlib) and tokens (JWT HS256, PyJWT). CPU-bound: callers run
``hash_password``/``verify_password`` off the event loop.

Tokens are checked on every REST call and join; :class:`TokenVerifier` remembers the claims of
tokens it verified, so a client that reuses its token pays PyJWT's decode and HMAC once.
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
    sub, exp = payload.get("sub"), payload.get("exp")
    if not isinstance(sub, str) or not isinstance(exp, int):
        raise Unauthorized("token is not valid; get one from POST /v1/tokens", code="token_invalid")
    if exp <= now_s:
        raise _expired()
    return Claims(user=sub, is_admin=bool(payload.get("adm", False)), expires_at_s=exp)


class TokenVerifier:
    """:func:`verify_token` for one secret, remembering the claims of the ``max_entries`` most
    recently used valid tokens.

    Rules: a remembered token is the exact string that was verified (a changed byte is another
    token, verified anew); expiry is checked on every call, so a remembered token stops working
    at its ``exp`` like any other, and is forgotten then; invalid tokens are never remembered
    (garbage cannot fill the memory). Tokens cannot be revoked one by one: what ends a token
    early is its user's deletion, which the caller checks apart from the token.
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
