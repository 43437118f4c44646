"""Accounts and tokens, the node's half that answers who is asking (docs/security.md,
"Accounts, passwords and tokens"): users, passwords, tokens, tickets and revocations.

Rules:

1. Every scrypt call goes through ``PasswordWork`` (bounded); a wrong name costs the time of
   a wrong password (a decoy hash), so names cannot be enumerated by timing.
2. A token names an account by id and is checked by ``auth.UserChecks``, the one place that
   decides what ends a token early.
3. A revocation made here (sign-out, password change, deletion) is applied at once -- the
   connections it ends close with 4501 -- and recorded in ``Revocations``, whose changes
   every node follows (``_follow_revocations``).

(A little over 500 lines, all of them this one job: the token checks, the revocation
follower and the holders they close share their state and are read together.)
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections.abc import Iterable
from typing import Final, Protocol

import trio

from chatnode.core import auth, validation
from chatnode.core.errors import (
    Conflict,
    Forbidden,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from chatnode.core.models import (
    Revocation,
    RevocationKind,
    User,
)
from chatnode.core.ports import (
    Directory,
    Revocations,
)
from chatnode.node.hub import Hub, Member
from chatnode.node.passwords import PasswordWork
from chatnode.node.ratelimit import Limiter, NodeLimits, address_key
from chatnode.node.settings import Backends, NodeSettings
from chatnode.wire.frames import CloseCode

log = logging.getLogger(__name__)


class Holder(Member, Protocol):
    """A member acting with a token (or insecure mode's claims): the node closes it with 4501
    once what it knows ends the token (``auth.UserChecks``). ``claims`` is read at that time,
    so a connection whose token is replaced updates it."""

    @property
    def claims(self) -> auth.Claims: ...


USER_CHECK_TTL_S = 5.0
ANONYMOUS_ADMIN: Final = auth.Claims(user="", is_admin=True, expires_at_s=2**62)
"""Insecure mode's caller without a token or ``?user=``: no account, no token (a value made
once: it is every such request's)."""
USER_LOOKUP_RETRY_S = 1.0
TICKET_RE = re.compile(r"[A-Za-z0-9_-]{20,64}")
LOGGED_NAME_CHARS = 64
CHANGES_PER_READ = 1000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _name_taken(name: str) -> Conflict:
    return Conflict(
        f"the user name {name!r} is already taken (names are compared ignoring case);"
        " choose another"
    )


def account_revocation(account_id: int, at_ms: int, *, token_ttl_s: float) -> Revocation:
    """Every token of the account issued at or before ``at_ms``: kept until the last of them
    expired."""
    return Revocation(
        RevocationKind.ACCOUNT,
        at_ms=at_ms,
        expires_at_ms=at_ms + int(token_ttl_s * 1000),
        account_id=account_id,
    )


async def set_admin(
    directory: Directory,
    revocations: Revocations,
    name: str,
    is_admin: bool,
    *,
    token_ttl_s: float,
) -> User | None:
    """Grant or withdraw the admin rights of the account ``name`` finds (``chatnode users
    grant-admin | revoke-admin``): the flag is in the directory and tokens carry it from
    their issue on. Withdrawing also revokes every token of the account issued until now,
    in the directory and in ``revocations`` (the nodes follow it: the account's open
    connections close with 4501). The account as it is now, None if there is none; raise
    ``Unavailable`` if either store did not take it."""
    at_ms = now_ms()
    user = await directory.set_admin(name, is_admin, revoked_before_ms=0 if is_admin else at_ms)
    if user is not None and not is_admin:
        await revocations.record(account_revocation(user.id, at_ms, token_ttl_s=token_ttl_s))
    return user


class Accounts:
    """The accounts-and-tokens operations of :class:`~chatnode.node.service.ChatNode`, its
    base class; the attributes below are set by ``ChatNode.__init__``."""

    settings: NodeSettings
    backends: Backends
    hub: Hub
    limits: NodeLimits
    passwords: PasswordWork
    login_failures: int
    revoked_connections: int
    _decoy_hash: str
    _tokens: auth.TokenVerifier
    _users: auth.UserChecks
    _lookups_resume_at: float
    _revocation_reads_resume_at: float
    _holders: dict[int, dict[str, Holder]]

    async def _within(self, limiter: Limiter, key: str, what: str) -> None:
        """Spend one token of ``key``; raise ``RateLimited`` saying ``what`` when there is none."""
        wait_s = await limiter.take(key)
        if wait_s:
            raise RateLimited(f"{what}; retry in {wait_s:.0f} s", retry_after_s=wait_s)

    async def create_user(self, name: object, password: object, *, client: str = "") -> User:
        """A new account. Its password must be strong enough (``validation.new_password``);
        the name must be free ignoring case (checked before hashing, and again by the
        directory). ``client`` (the caller's address) is limited to ``signups_per_address``,
        every request counted, before anything else is done."""
        await self._within(
            self.limits.signups_per_address,
            address_key(client),
            "too many users created from your address",
        )
        limits = self.settings.limits
        name = validation.user_name(name, limits)
        if password is None and self.settings.insecure:
            password_hash = "!"  # insecure mode: a user without a password
        else:
            secret = validation.new_password(password, limits, user=name)
            if await self.backends.directory.get_user(name) is not None:
                raise _name_taken(name)
            password_hash = await self.passwords.hash(secret)
        return await self.backends.directory.create_user(
            name, password_hash, created_at_ms=now_ms()
        )

    async def issue_token(
        self, name: object, password: object, *, client: str = ""
    ) -> tuple[str, int]:
        """A token for the account, if the password is right; the admin flag is read from
        the directory now. A failure is logged with the name and ``client`` (the address)
        and counted (``login_failures``); the password never is.

        Every request of ``client`` counts against ``logins_per_address``; every wrong
        password of an account (its name ignoring case) against ``login_failures_per_account``,
        spent before the password is checked and given back unless it was wrong: once an
        account is out of attempts even the right password gets 429 (a guesser learns
        nothing) until the next one is due. Any name is limited alike (no hint whether the
        user exists)."""
        await self._within(
            self.limits.logins_per_address,
            address_key(client),
            "too many token requests from your address",
        )
        failures = self.limits.login_failures
        account = (
            validation.name_key(name)
            if isinstance(name, str)
            and len(name) <= 256
            and validation.USER_NAME_RE.fullmatch(name)
            else None
        )
        if account is None:
            return await self._checked_token(name, password, client=client)
        await self._within(
            failures, account, "too many wrong passwords for this user; wait before trying"
        )
        try:
            issued = await self._checked_token(name, password, client=client)
        except Unauthorized:
            raise  # a wrong password: it counts
        except BaseException:
            failures.give_back(account)
            raise
        failures.give_back(account)
        return issued

    async def _checked_token(
        self, name: object, password: object, *, client: str
    ) -> tuple[str, int]:
        if not isinstance(name, str) or not isinstance(password, str):
            raise Unauthorized("name and password are required", code="bad_credentials")
        user = await self._check_password(name, password, client=client)
        token, claims = self._new_token(user)
        return token, claims.expires_at_s

    async def _check_password(self, name: str, password: str, *, client: str) -> User:
        """The account ``name`` finds, if ``password`` is its password (bounded work,
        ``PasswordWork``); else ``Unauthorized`` (``bad_credentials``), logged and counted."""
        limits = self.settings.limits
        plausible = (
            0 < len(name) <= 4 * limits.max_user_name_chars
            and 0 < len(password) <= limits.max_password_chars
        )
        user = await self.backends.directory.get_user(name) if plausible else None
        ok = plausible and await self.passwords.verify(
            password, user.password_hash if user is not None else self._decoy_hash
        )
        if user is None or not ok:
            self.login_failures += 1
            log.warning(
                "sign-in failed: user %r from %s",
                name[:LOGGED_NAME_CHARS],
                client or "an unknown address",
            )
            raise Unauthorized("wrong user name or password", code="bad_credentials")
        return user

    def _new_token(self, user: User) -> tuple[str, auth.Claims]:
        """A token of ``user``'s account, issued after every revocation of it this node knows
        (the account's, the last deletion of everyone): a node whose clock is behind the one
        that revoked still issues a live token."""
        now = now_ms()
        claims = auth.Claims(
            user=user.name,
            is_admin=user.is_admin,
            expires_at_s=now // 1000 + int(self.settings.token_ttl_s),
            issued_at_ms=max(now, user.revoked_before_ms + 1, self._users.all_deleted_at_ms + 1),
            account_id=user.id,
            token_id=auth.new_token_id(),
        )
        return auth.issue_token(claims, secret=self.settings.jwt_secret), claims

    async def authenticate(
        self, token: str | None, *, user_param: str | None = None
    ) -> auth.Claims:
        """The caller's identity: a valid token, or in insecure mode ``?user=`` of an existing
        user (or an anonymous admin when neither is given)."""
        if token:
            claims = self._tokens.verify(token, now_s=int(time.time()))
            await self._check_token(claims)
            return claims
        if self.settings.insecure:
            if user_param:
                user = await self.backends.directory.get_user(user_param)
                if user is None:
                    raise NotFound(
                        f"user {user_param!r} does not exist; create it first",
                        code="user_not_found",
                    )
                return auth.Claims(
                    user=user.name,
                    is_admin=True,
                    expires_at_s=2**62,
                    issued_at_ms=now_ms(),
                    account_id=user.id,
                )
            return ANONYMOUS_ADMIN
        raise Unauthorized(
            "a token is required: POST /v1/tokens, then send 'Authorization: Bearer <token>'"
            " (WebSocket joins from a browser: '?ticket=' from POST /v1/tickets)",
            code="token_required",
        )

    async def _check_token(self, claims: auth.Claims) -> None:
        """Raise ``Unauthorized`` unless the verified token may act (``auth.UserChecks``'
        rules). What this node knows of revocations decides first; a token the backends
        accepted less than ``USER_CHECK_TTL_S`` ago needs no query (a REST call with a known
        token costs none); otherwise the directory is asked for the account and the
        revocation store for the token. While the directory is unavailable the token is
        accepted unless known revoked, and the next lookup waits ``USER_LOOKUP_RETRY_S``, so
        that no check waits for a dead directory more than once a second per node (the
        revocation store likewise)."""
        users = self._users
        refusal = users.refusal(claims)
        if refusal is not None:
            raise refusal
        if users.trusted(claims, trio.current_time()):
            return
        user: User | None = None
        answered = False
        if trio.current_time() >= self._lookups_resume_at:
            try:
                user = await self.backends.directory.get_user_by_id(claims.account_id)
                answered = True
            except Unavailable:
                self._lookups_resume_at = trio.current_time() + USER_LOOKUP_RETRY_S
        if answered and user is None:
            users.not_found(claims.account_id, at_ms=now_ms())
            self._close_refused(self._holders.get(claims.account_id, {}).values())
            raise Unauthorized(
                "the token's account no longer exists; create it again", code="token_invalid"
            )
        await self._read_revocations(claims)
        if user is not None:
            users.found(claims, user, trio.current_time())
        else:
            users.accept(claims, trio.current_time())
        refusal = users.refusal(claims)
        if refusal is not None:
            raise refusal

    async def _read_revocations(self, claims: auth.Claims) -> None:
        """What the revocation store holds about the token, into ``UserChecks``."""
        if trio.current_time() < self._revocation_reads_resume_at:
            return
        try:
            state = await self.backends.revocations.lookup(
                account_id=claims.account_id, token_id=claims.token_id
            )
        except Unavailable:
            self._revocation_reads_resume_at = trio.current_time() + USER_LOOKUP_RETRY_S
            log.warning(
                "token checks: the revocation store does not answer; deciding from what this"
                " node knows",
                exc_info=True,
            )
            return
        self._users.learn_state(claims, state)

    async def sign_out(self, claims: auth.Claims) -> None:
        """Revoke the token of ``claims`` on every node (``DELETE /v1/tokens/current``)."""
        if not claims.token_id:
            raise Unauthorized("signing out needs a token", code="token_required")
        revocation = Revocation(
            RevocationKind.TOKEN,
            at_ms=now_ms(),
            expires_at_ms=claims.expires_at_s * 1000,
            account_id=claims.account_id,
            token_id=claims.token_id,
        )
        await self._revoke(revocation, "a sign-out", required=True)

    async def change_password(
        self, claims: auth.Claims, password: object, new_password: object, *, client: str = ""
    ) -> tuple[str, int]:
        """Replace the account's password (the current one is checked like a sign-in) and
        revoke every token issued until now, the one used included; return a new token."""
        if not claims.token_id:
            raise Unauthorized("changing a password needs a token", code="token_required")
        if not isinstance(password, str):
            raise Unauthorized("the current password is required", code="bad_credentials")
        user = await self._check_password(claims.user, password, client=client)
        if user.id != claims.account_id:
            raise Unauthorized("wrong user name or password", code="bad_credentials")
        secret = validation.new_password(new_password, self.settings.limits, user=user.name)
        password_hash = await self.passwords.hash(secret)
        cutoff = max(now_ms(), claims.issued_at_ms)
        updated = await self.backends.directory.set_password(
            user.id, password_hash, revoked_before_ms=cutoff
        )
        if updated is None:
            raise Unauthorized(
                "the token's account no longer exists; create it again", code="token_invalid"
            )
        await self._revoke(
            account_revocation(updated.id, cutoff, token_ttl_s=self.settings.token_ttl_s),
            "a password change",
            required=False,
        )
        token, new_claims = self._new_token(updated)
        return token, new_claims.expires_at_s

    async def _revoke(self, revocation: Revocation, what: str, *, required: bool) -> None:
        """Apply ``revocation`` here (connections it ends close at once), then record it for
        every node. ``required``: a revocation the store did not take raises ``Unavailable``
        (the caller retries: recording again is harmless); otherwise it is logged (the
        directory holds it: other nodes learn it at their next lookup, within
        ``USER_CHECK_TTL_S``, but their open connections stay open)."""
        self._apply_revocation(revocation)
        try:
            await self.backends.revocations.record(revocation)
        except Unavailable:
            log.warning(
                "%s was applied on this node but not recorded for the other nodes",
                what,
                exc_info=True,
            )
            if required:
                raise

    def _apply_revocation(self, revocation: Revocation) -> None:
        """Learn ``revocation`` and close the connections of this node it ends (4501)."""
        self._users.learn(revocation)
        if revocation.kind is RevocationKind.ALL:
            self._close_refused(self._all_holders())
        else:
            self._close_refused(self._holders.get(revocation.account_id, {}).values())

    def _all_holders(self) -> list[Holder]:
        return [holder for held in self._holders.values() for holder in held.values()]

    def _close_refused(self, holders: Iterable[Holder]) -> None:
        for holder in list(holders):
            refusal = self._users.refusal(holder.claims)
            if refusal is not None:
                self.revoked_connections += 1
                reason = "token revoked" if refusal.code == "token_revoked" else "account deleted"
                holder.close_nowait(CloseCode.FORBIDDEN, f"{reason}; sign in again")

    def _hold(self, member: Holder) -> dict[str, Holder]:
        """Register ``member`` for revocations (``_release`` ends it); a token revoked since
        it was checked is refused here. (Not a context manager: its suspended generator
        would be memory every idle connection keeps.)"""
        held = self._holders.setdefault(member.claims.account_id, {})
        held[member.conn_id] = member
        refusal = self._users.refusal(member.claims)
        if refusal is not None:
            self._release(member, held)
            raise refusal
        return held

    def hold(self, member: Holder) -> dict[str, Holder]:
        """:meth:`_hold` for a connection that holds a token outside a room (``/v1/connect``)."""
        return self._hold(member)

    def release(self, member: Holder, held: dict[str, Holder]) -> None:
        self._release(member, held)

    def _release(self, member: Holder, held: dict[str, Holder]) -> None:
        held.pop(member.conn_id, None)
        account_id = member.claims.account_id
        if not held and self._holders.get(account_id) is held:
            del self._holders[account_id]

    async def _follow_revocations(self) -> None:
        """Apply what any node records (``Revocations.changes``), every ``revocation_poll_s``:
        a revocation made on another node closes this node's connections it ends within that
        time plus one read. When changes may have been missed (the store did not answer when
        following began, or dropped records unread), every held connection's token is
        checked again with the backends."""
        cursor: str | None = None
        missed = failing = False
        while True:
            try:
                changes = await self.backends.revocations.changes(cursor, limit=CHANGES_PER_READ)
            except Unavailable:
                if not failing:
                    log.warning("revocations: cannot read the changes; retrying", exc_info=True)
                failing = True
                missed = missed or cursor is None
            else:
                if failing:
                    log.info("revocations: reading the changes again")
                failing = False
                for revocation in changes.revocations:
                    self._apply_revocation(revocation)
                cursor = changes.cursor
                if missed or not changes.complete:
                    missed = False
                    await self._check_holders_again()
                if len(changes.revocations) >= CHANGES_PER_READ:
                    continue
            await trio.sleep(self.settings.revocation_poll_s)

    async def _check_holders_again(self) -> None:
        """Check every held connection's token with the backends; close those refused."""
        holders = self._all_holders()
        log.info("revocations: checking the tokens of %d connections again", len(holders))
        checked: set[str] = set()
        for holder in holders:
            claims = holder.claims
            if not claims.token_id or claims.token_id in checked:
                continue
            checked.add(claims.token_id)
            self._users.distrust(claims)
            with contextlib.suppress(Unauthorized):  # closed below
                await self._check_token(claims)
        self._close_refused(holders)

    async def issue_ticket(self, token: str | None) -> tuple[str, int]:
        """A ticket that stands for ``token`` for ``ticket_ttl_s``, once, on any node (a
        browser's WebSocket join: ``?ticket=`` keeps the token out of the URL). An account
        gets at most ``tickets_per_account`` per ``ticket_ttl_s``."""
        claims = await self.authenticate(token)
        if not token or not claims.token_id:
            raise Unauthorized("a ticket needs a token", code="token_required")
        settings = self.settings
        ticket = secrets.token_urlsafe(24)
        issued = await self.backends.tickets.issue(
            ticket,
            token,
            account_id=claims.account_id,
            ttl_ms=int(settings.ticket_ttl_s * 1000),
            max_per_account=settings.tickets_per_account,
        )
        if not issued:
            raise RateLimited(
                f"at most {settings.tickets_per_account} tickets per {settings.ticket_ttl_s:g} s"
                " per account",
                retry_after_s=settings.ticket_ttl_s,
            )
        return ticket, int(time.time() + settings.ticket_ttl_s)

    async def redeem_ticket(self, ticket: str) -> str:
        """The token a live ticket stands for; the ticket is used up, on every node."""
        token = await self.backends.tickets.redeem(ticket) if TICKET_RE.fullmatch(ticket) else None
        if token is None:
            raise Unauthorized(
                "the ticket is unknown, expired or already used; get a new one from"
                " POST /v1/tickets",
                code="ticket_invalid",
            )
        return token

    async def delete_all_users(self, claims: auth.Claims) -> int:
        """Delete every user and membership; then revoke every token issued until now, on
        this node at once (its connections close with 4501) and, through ``Revocations``,
        on every node (also while the directory is down). A deletion that failed is not
        recorded (it may not have happened)."""
        if not claims.is_admin:
            raise Forbidden("only an admin may delete users", code="admin_only")
        self.hub.forget_members()
        deleted = await self.backends.directory.delete_all_users()
        at_ms = now_ms()
        await self._revoke(
            Revocation(
                RevocationKind.ALL,
                at_ms=at_ms,
                expires_at_ms=at_ms + int(self.settings.token_ttl_s * 1000),
            ),
            "a deletion of every user",
            required=False,
        )
        return deleted
