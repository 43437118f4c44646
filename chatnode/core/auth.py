"""Passwords (scrypt, stdlib) and tokens (JWT HS256, PyJWT). CPU-bound: callers run
``hash_password``/``verify_password`` off the event loop.

Tokens are checked on every REST call and join, in two steps: :class:`TokenVerifier` checks
the signature and expiry (and remembers the claims of tokens it verified, so a client that
reuses its token pays PyJWT's decode and HMAC once); :class:`UserChecks` then decides whether
the token may still act -- the one place where what ends a token early is decided: its
revocation (signed out), its account's (deleted, password changed, admin rights withdrawn).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from collections import OrderedDict
from typing import Any

import attrs
import jwt

from chatnode.core.errors import Unauthorized
from chatnode.core.models import Revocation, RevocationKind, RevocationState, User

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
    """Who acts. A token's: its account's name (as registered) and id, whether the account
    was an admin when the token was issued, its expiry (epoch s), its issue time (epoch ms:
    what revocations compare with) and its id. Insecure mode's claims without a token have
    ``token_id`` ``""``."""

    user: str
    is_admin: bool
    expires_at_s: int
    issued_at_ms: int = 0
    account_id: int = 0
    token_id: str = ""


TOKEN_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def new_token_id() -> str:
    return secrets.token_urlsafe(12)


def issue_token(claims: Claims, *, secret: str) -> str:
    """The JWT of ``claims``: ``sub`` the account id, ``name``, ``adm``, ``jti`` the token id,
    ``ims`` the issue time in ms, ``iat`` and ``exp`` in s."""
    payload = {
        "sub": str(claims.account_id),
        "name": claims.user,
        "adm": claims.is_admin,
        "jti": claims.token_id,
        "iat": claims.issued_at_ms // 1000,
        "ims": claims.issued_at_ms,
        "exp": claims.expires_at_s,
    }
    return jwt.encode(payload, secret, algorithm="HS256")


def verify_token(token: str, *, secret: str, now_s: int) -> Claims:
    """Raise ``Unauthorized`` (code ``token_invalid`` or ``token_expired``). A token must name
    an account by id (tokens that named a user by name only are refused: sign in again)."""
    try:
        payload = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            options={
                "require": ["sub", "exp", "jti", "ims", "name"],
                "verify_exp": False,
                "verify_iat": False,  # ``ims`` is what counts; a node's clock may be behind
            },
        )
    except jwt.PyJWTError:
        raise _invalid() from None
    sub, exp, ims = payload.get("sub"), payload.get("exp"), payload.get("ims")
    name, jti, adm = payload.get("name"), payload.get("jti"), payload.get("adm", False)
    if not (
        isinstance(sub, str)
        and sub.isascii()
        and sub.isdigit()
        and 0 < len(sub) <= 19
        and type(exp) is int
        and type(ims) is int
        and isinstance(name, str)
        and isinstance(jti, str)
        and TOKEN_ID_RE.fullmatch(jti)
        and isinstance(adm, bool)
    ):
        raise _invalid()
    if exp <= now_s:
        raise _expired()
    return Claims(
        user=name,
        is_admin=adm,
        expires_at_s=exp,
        issued_at_ms=ims,
        account_id=int(sub),
        token_id=jti,
    )


def _invalid() -> Unauthorized:
    return Unauthorized("token is not valid; get one from POST /v1/tokens", code="token_invalid")


class TokenVerifier:
    """:func:`verify_token` for one secret, remembering the claims of the ``max_entries`` most
    recently used valid tokens.

    Rules: a remembered token is the exact string that was verified (a changed byte is another
    token, verified anew); expiry is checked on every call, so a remembered token stops working
    at its ``exp`` like any other, and is forgotten then; invalid tokens are never remembered
    (garbage cannot fill the memory). Whether a valid token was revoked is not decided here:
    :class:`UserChecks` decides it apart from the signature.
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
    """Whether a verified token may still act: what this node knows of revocations and of
    accounts, and the rules that decide from it. The node asks the directory and the
    revocation store (``ports.Revocations``) and reports each answer here (``found``,
    ``not_found``, ``learn``, ``learn_state``); nothing here does I/O.

    Rules:

    1. **Known revocations refuse first, trust comes second.** A token is refused when this
       node knows (a) its id was revoked (signed out), (b) its account was found absent or
       deleted at a time T, or every account existing at T was deleted (``DELETE /v1/users``),
       and the token was issued at or before T, or (c) its account's tokens issued at or
       before T were revoked (password changed, admin rights withdrawn) and it was. Issue
       times are the token's ``ims`` (ms); a token of the same millisecond as T counts as
       older (the safe side). Checked on every call, before trust, so a revocation this node
       learns ends every token it concerns at once, trusted or not.
    2. **The backends decide when they answer.** A token whose account the directory found,
       with the account's ``revoked_before_ms`` and admin flag applied, and not refused by
       what the revocation store said of it, is trusted for ``trust_s`` (seconds of the
       node's clock): checks in that time need no backend query (a REST call with a known
       token costs none). An account the directory does not find is absent from then on
       (a re-registered name is a new account, with a new id). A token that says admin of an
       account the directory says is not is refused.
    3. **When the directory cannot answer** (MySQL down), a token is accepted unless refused
       by rule 1, with what the revocation store said of it (Redis: shared by every node, so
       a revocation any node recorded before the outage holds on every node); so accepted,
       it is trusted for ``trust_s`` too. Passwords and new tokens still need the directory.
    4. **What is known only grows, within bounds.** Times only move forward. Revoked token ids
       are kept until the token expires, account times and absent accounts the
       ``max_entries`` most recent; trusted tokens at most ``max_entries``. Forgetting a
       revocation drops every trust (the next checks ask the backends again), so a bound
       never lets a revoked token through while the backends answer.
    """

    def __init__(self, *, trust_s: float, max_entries: int = 100_000) -> None:
        self.trust_s = trust_s
        self.max_entries = max_entries
        self._trusted: dict[str, float] = {}  # token id -> trusted until (node clock, s)
        self._revoked: OrderedDict[str, int] = OrderedDict()  # token id -> its expiry (s)
        self._accounts: OrderedDict[int, int] = OrderedDict()  # id -> tokens revoked to (ms)
        self._absent: OrderedDict[int, int] = OrderedDict()  # id -> found absent at (ms)
        self.all_deleted_at_ms = 0

    # -- deciding ---------------------------------------------------------------------------

    def refusal(self, claims: Claims) -> Unauthorized | None:
        """Rule 1: why this node refuses the token, or None."""
        if claims.token_id and claims.token_id in self._revoked:
            return Unauthorized(
                "the token was revoked (signed out); get a new one from POST /v1/tokens",
                code="token_revoked",
            )
        issued = claims.issued_at_ms
        if (
            issued <= self._absent.get(claims.account_id, -1)
            or 0 < self.all_deleted_at_ms >= issued
        ):
            return Unauthorized(
                "the token's account no longer exists; create it again", code="token_invalid"
            )
        if issued <= self._accounts.get(claims.account_id, -1):
            return Unauthorized(
                "the token was revoked (the account's password changed or its admin rights"
                " ended); get a new one from POST /v1/tokens",
                code="token_revoked",
            )
        return None

    def trusted(self, claims: Claims, now: float) -> bool:
        """Rule 2: the backends accepted this token less than ``trust_s`` ago."""
        return self._trusted.get(claims.token_id, -1.0) > now

    # -- what the backends said ----------------------------------------------------------------

    def found(self, claims: Claims, user: User, now: float) -> None:
        """The directory found the token's account (at ``now``, node clock) as ``user``."""
        if user.revoked_before_ms:
            self._learn_account(user.id, user.revoked_before_ms)
        if claims.is_admin and not user.is_admin:
            self._learn_token(claims.token_id, claims.expires_at_s)
        self.accept(claims, now)

    def accept(self, claims: Claims, now: float) -> None:
        """Rules 2 and 3: trust the token for ``trust_s`` unless refused."""
        if not claims.token_id or self.refusal(claims) is not None:
            return
        if len(self._trusted) >= self.max_entries:
            self._trusted.clear()  # each entry is worth one lookup: cheap to rebuild
        self._trusted[claims.token_id] = now + self.trust_s

    def distrust(self, claims: Claims) -> None:
        """Ask the backends again at the next check of this token."""
        self._trusted.pop(claims.token_id, None)

    def not_found(self, account_id: int, *, at_ms: int) -> None:
        """The directory had no account ``account_id`` at wall time ``at_ms``."""
        self._absent[account_id] = max(at_ms, self._absent.pop(account_id, 0))
        self._bound(self._absent)

    def learn(self, revocation: Revocation) -> None:
        """A revocation recorded by this node or another (rule 1)."""
        if revocation.kind is RevocationKind.TOKEN:
            self._learn_token(revocation.token_id, revocation.expires_at_ms // 1000)
        elif revocation.kind is RevocationKind.ACCOUNT:
            self._learn_account(revocation.account_id, revocation.at_ms)
        else:
            self.all_deleted_at_ms = max(self.all_deleted_at_ms, revocation.at_ms)

    def learn_state(self, claims: Claims, state: RevocationState) -> None:
        """What the revocation store holds about the token of ``claims``."""
        if state.token_revoked:
            self._learn_token(claims.token_id, claims.expires_at_s)
        if state.account_before_ms:
            self._learn_account(claims.account_id, state.account_before_ms)
        self.all_deleted_at_ms = max(self.all_deleted_at_ms, state.all_before_ms)

    def _learn_token(self, token_id: str, expires_at_s: int) -> None:
        if not token_id:
            return
        self._trusted.pop(token_id, None)
        self._revoked[token_id] = expires_at_s
        self._revoked.move_to_end(token_id)
        self._bound(self._revoked)

    def _learn_account(self, account_id: int, at_ms: int) -> None:
        self._accounts[account_id] = max(at_ms, self._accounts.pop(account_id, 0))
        self._bound(self._accounts)

    def _bound(self, table: OrderedDict[Any, int]) -> None:
        """Rule 4: forget the oldest entries past ``max_entries``, and with them every trust."""
        if len(table) > self.max_entries:
            while len(table) > self.max_entries:
                table.popitem(last=False)
            self._trusted.clear()
