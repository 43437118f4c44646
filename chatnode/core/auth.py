"""Passwords (scrypt, stdlib) and tokens (JWT HS256, PyJWT). CPU-bound: callers run
``hash_password``/``verify_password`` off the event loop."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

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
        raise Unauthorized(
            "token has expired; get a new one from POST /v1/tokens", code="token_expired"
        )
    return Claims(user=sub, is_admin=bool(payload.get("adm", False)), expires_at_s=exp)
