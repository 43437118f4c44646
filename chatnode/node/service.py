"""The node's operations, as the edge calls them: users, tokens, rooms, history, search, and
room connections. Everything here is transport-neutral; ``edge/`` maps it to HTTP/WebSocket.

Ownership: ``ChatNode.run`` owns the node's background tasks (bus receiver, archiver,
presence heartbeat and reaper, revocation follower) in its nursery; connections are owned by
the edge and enter a room through ``ChatNode.join``, an async context manager that leaves the
room on exit, also on cancellation.

Accounts and tokens (docs/security.md, "Accounts, passwords and tokens"): every scrypt call
goes through ``PasswordWork`` (bounded); a token names an account by id and is checked by
``auth.UserChecks``, the one place that decides what ends a token early. A revocation made
here (sign-out, password change, deletion) is applied at once -- the connections it ends
close with 4501 -- and recorded in ``Revocations``, whose changes every node follows.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Final, Protocol

import attrs
import trio

from chatnode.core import auth, validation
from chatnode.core.errors import (
    Conflict,
    Forbidden,
    NotFound,
    OffsetUnknown,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from chatnode.core.models import (
    ChatMessage,
    Draft,
    PresenceEntry,
    Revocation,
    RevocationKind,
    Room,
    SearchHit,
    SearchQuery,
    User,
)
from chatnode.core.ports import (
    Archive,
    ArchiveFeed,
    Bus,
    Directory,
    Presence,
    RateLimits,
    Revocations,
    Tickets,
)
from chatnode.node.archiver import Archiver
from chatnode.node.hub import Hub, Member, RoomSession, Seat
from chatnode.node.passwords import PasswordWork
from chatnode.node.ratelimit import Limiter, NodeLimits, Rate, Rates, address_key
from chatnode.wire import frames
from chatnode.wire.frames import CloseCode

log = logging.getLogger(__name__)


@attrs.frozen
class NodeSettings:
    """What the node needs of the configuration (built by app.py from Config)."""

    node_id: str
    jwt_secret: str
    token_ttl_s: float
    insecure: bool
    password_cost_log2: int
    history_on_join: int
    max_replay: int
    rate_messages_per_s: float
    rate_burst: int
    presence_ttl_s: float
    limits: validation.Limits = attrs.Factory(validation.Limits)
    archive_linger_s: float = 1.0
    replay_page_messages: int = 200
    password_concurrency: int = 2
    password_queue: int = 32
    ticket_ttl_s: float = 30.0
    tickets_per_account: int = 10
    revocation_poll_s: float = 1.0
    rates: Rates = attrs.Factory(Rates)


@attrs.frozen
class Backends:
    directory: Directory
    bus: Bus
    archive: Archive
    presence: Presence
    revocations: Revocations
    tickets: Tickets
    feed: ArchiveFeed | None = None
    rate_limits: RateLimits | None = None
    """The shared buckets of the rate limits; None: each node limits alone."""


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


class ChatNode:
    def __init__(self, settings: NodeSettings, backends: Backends) -> None:
        self.settings = settings
        self.backends = backends
        self.hub = Hub(
            backends.bus, backends.archive, cache_size=max(256, 2 * settings.history_on_join)
        )
        self.archiver = (
            Archiver(backends.feed, backends.archive, linger_s=settings.archive_linger_s)
            if backends.feed
            else None
        )
        self._conn_counter = 0
        # Unknown names are checked against this hash so that a wrong name costs the same
        # time as a wrong password (no user enumeration by timing).
        self._decoy_hash = auth.hash_password("decoy", cost_log2=settings.password_cost_log2)
        self.passwords = PasswordWork(
            concurrency=settings.password_concurrency,
            max_waiting=settings.password_queue,
            cost_log2=settings.password_cost_log2,
        )
        self._tokens = auth.TokenVerifier(settings.jwt_secret)
        self._users = auth.UserChecks(trust_s=USER_CHECK_TTL_S)
        self._lookups_resume_at = float("-inf")  # trio time
        self._revocation_reads_resume_at = float("-inf")  # trio time
        self._holders: dict[int, dict[str, Holder]] = {}  # account id -> conn id -> member
        self.login_failures = 0
        self.revoked_connections = 0
        # Rooms are never deleted or renamed: what this node has seen once it need not ask the
        # directory again. (Memberships can end: the hub keeps those it confirmed, Rule 8.)
        self._rooms: dict[int, Room] = {}
        self.limits = NodeLimits(
            Rate(settings.rate_messages_per_s, settings.rate_burst),
            settings.rates,
            backends.rate_limits,
        )
        self.rooms_created = 0
        self._presence: set[PresenceEntry] = set()  # this node's live connections

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node's background tasks until cancelled; ``started()`` once the bus is up."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.backends.bus.serve, self.hub)
            nursery.start_soon(self._presence_loop)
            nursery.start_soon(self._follow_revocations)
            if self.archiver is not None:
                await nursery.start(self.archiver.run)
            task_status.started()

    async def _presence_loop(self) -> None:
        """Heartbeat and reap every ``presence_ttl_s / 3``. A heartbeat that comes after a
        failed one, or later than ``presence_ttl_s`` after the last good one, may come after
        another node reaped this node's entries as a dead node's (a Redis outage longer than
        the TTL does that), so it is followed by writing every local entry again."""
        ttl_s = self.settings.presence_ttl_s
        last_ok: float | None = None
        failed = False
        while True:
            try:
                await self.backends.presence.heartbeat(
                    self.settings.node_id, ttl_ms=int(ttl_s * 1000)
                )
                now = trio.current_time()
                if failed or (last_ok is not None and now - last_ok >= ttl_s):
                    await self._restore_presence()
                last_ok, failed = now, False
                reaped = await self.backends.presence.reap()
                if reaped:
                    log.info("reaped %d presence entries of dead nodes", reaped)
            except Exception:
                failed = True
                log.warning("presence heartbeat failed; retrying", exc_info=True)
            await trio.sleep(ttl_s / 3)

    async def _restore_presence(self) -> None:
        """Write every local entry again (idempotent). An entry whose connection ended
        meanwhile is removed again afterwards, whatever order the two writes took."""
        entries = list(self._presence)
        for entry in entries:
            await self.backends.presence.add(entry)
        for entry in entries:
            if entry not in self._presence:
                await self.backends.presence.remove(entry)
        if entries:
            log.info("presence: wrote %d local entries again after a heartbeat gap", len(entries))

    def next_conn_id(self) -> str:
        self._conn_counter += 1
        return f"{self.settings.node_id}/{self._conn_counter}"

    # -- users and tokens -----------------------------------------------------------------------

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
            password_hash = "!"  # the seed's open mode: a user without a password
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

    # -- rooms --------------------------------------------------------------------------------

    async def create_room(self, name: object, *, claims: auth.Claims) -> Room:
        """Create a room; a user (not an admin) is limited to ``room_creations``."""
        if name is None:
            name = "room"
        name = validation.room_name(name, self.settings.limits)
        if not claims.is_admin:
            await self._within(self.limits.room_creations, claims.user, "too many rooms created")
        room = await self.backends.directory.create_room(name, created_at_ms=now_ms())
        self.rooms_created += 1
        try:  # the room starts at offset 0 on the bus: its first message needs no archive read
            await self.backends.bus.restore(room.id, last_offset=0)
        except Unavailable as exc:
            log.info("room %d: offset not set on the bus yet (%s)", room.id, exc)
        return room

    async def list_rooms(self, *, after_id: int, limit: int) -> list[Room]:
        return await self.backends.directory.list_rooms(after_id=after_id, limit=limit)

    async def room(self, room_id: int) -> Room:
        room = self._rooms.get(room_id)
        if room is None:
            room = await self.backends.directory.get_room(room_id)
            if room is None:
                raise NotFound(f"chatroom {room_id} does not exist", code="room_not_found")
            if len(self._rooms) > 100_000:
                self._rooms.clear()
            self._rooms[room_id] = room
        return room

    async def _ensure_member(self, session: RoomSession, claims: auth.Claims) -> None:
        """Make the claims' account a member of the session's room unless this node confirmed
        it while subscribed (hub Rule 8); ``RoomFull``, ``NotFound``, ``Unavailable``."""
        if session.members.get(claims.user) == claims.account_id:
            return
        removals = session.removals
        await self.backends.directory.add_member(
            session.room_id, claims.user, max_members=self.settings.limits.max_room_members
        )
        if session.removals == removals:  # no removal raced the confirmation
            session.members[claims.user] = claims.account_id

    async def remove_member(self, claims: auth.Claims, room_id: int, name: str) -> bool:
        """End the membership of the user ``name`` (ignoring case) in the room: themselves,
        or anyone for an admin. The seat is free at once; every node closes the user's
        connections to the room (4501, hub Rule 8). Whether they were a member; the user may
        join again later (a new membership, within the room's limit). Idempotent: retry it
        after ``Unavailable`` (the signal to the nodes may not have gone out)."""
        if validation.name_key(name) != validation.name_key(claims.user) and not claims.is_admin:
            raise Forbidden(
                "only the member themselves or an admin may remove a member", code="admin_only"
            )
        await self.room(room_id)
        user = await self.backends.directory.get_user(name)
        name = user.name if user is not None else name
        removed = await self.backends.directory.remove_member(room_id, name)
        await self.backends.bus.signal(room_id, frames.member_removed_event(room_id, name))
        return removed

    async def room_users(self, room_id: int) -> tuple[list[str], list[str]]:
        """(members, online) of a room."""
        await self.room(room_id)
        members = await self.backends.directory.list_members(room_id)
        online = await self.backends.presence.online(room_id)
        return members, online

    async def history(self, room_id: int, *, before: int | None, limit: int) -> list[ChatMessage]:
        """Up to ``limit`` messages older than offset ``before`` (default: the newest), newest last."""
        await self.room(room_id)
        head = await self.hub.head(room_id)
        up_to = head if before is None else min(head, before - 1)
        after = max(0, up_to - limit)
        return await self.hub.load_range(room_id, after, up_to)

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        return await self.backends.archive.search(query)

    # -- room connections ---------------------------------------------------------------------

    @asynccontextmanager
    async def join(
        self, room_id: int, member: Holder, *, since: int | None = None
    ) -> AsyncIterator[RoomConnection]:
        """Enter a room: a seat, and the first page of its history, so that a refusal
        (unknown room, room full, history unavailable) comes before the caller answers the
        upgrade. The caller then runs ``RoomConnection.replay`` as the member can take it,
        and the seat goes live (hub Rules 3 and 5). Leaves on exit. While in the room the
        member is closed with 4501 once its token is revoked, or its membership ends. The
        membership is checked once the seat is taken: a removal signalled from then on finds
        it (hub Rule 8)."""
        held = self._hold(member)
        try:
            await self.room(room_id)
            entry = PresenceEntry(room_id, member.user, self.settings.node_id, member.conn_id)
            session, seat = await self.hub.attach(room_id, member)
            entered = False
            try:
                await self._ensure_member(session, member.claims)
                entered = True
                self._presence.add(entry)
                await self.backends.presence.add(entry)
                connection = RoomConnection(self, session, seat, member)
                await connection.prepare(since)
                await self._signal(room_id, frames.presence_event(room_id, member.user, "join"))
                yield connection
            finally:
                self._presence.discard(entry)
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await self.hub.detach(room_id, member)
                    try:
                        if entered:
                            await self.backends.presence.remove(entry)
                            await self._signal(
                                room_id, frames.presence_event(room_id, member.user, "leave")
                            )
                    except Exception:
                        log.warning("presence cleanup failed for %s", entry, exc_info=True)
        finally:
            self._release(member, held)

    async def _signal(self, room_id: int, event: dict[str, object]) -> None:
        try:
            await self.backends.bus.signal(room_id, event)
        except Exception:
            log.warning("room %d: event not sent", room_id, exc_info=True)

    async def check(self) -> dict[str, str]:
        """Readiness of every backend: name -> "ok" or the error."""
        result: dict[str, str] = {}
        for name, backend in (
            ("directory", self.backends.directory),
            ("bus", self.backends.bus),
            ("archive", self.backends.archive),
            ("presence", self.backends.presence),
        ):
            try:
                with trio.fail_after(2):
                    await backend.check()
                result[name] = "ok"
            except Exception as exc:
                result[name] = f"{type(exc).__name__}: {exc}"
        return result


class RoomConnection:
    """One member's presence in one room, owned by its connection task. Its messages, pings
    and typing count against the user's limits, shared by all their connections on every
    node (``node/ratelimit.py``)."""

    def __init__(self, node: ChatNode, session: RoomSession, seat: Seat, member: Member) -> None:
        self._node = node
        self._session = session
        self._seat = seat
        self._member = member
        self._limits = node.limits
        self._typing_key = f"{session.room_id}:{member.user}"
        self.head = 0
        self._after = 0
        self._gap: tuple[int, int] | None = None
        self._first_page: list[ChatMessage] = []

    @property
    def room_id(self) -> int:
        return self._session.room_id

    @property
    def limits(self) -> validation.Limits:
        return self._node.settings.limits

    async def prepare(self, since: int | None) -> None:
        """Plan the replay and load its first page (``Unavailable`` if the history cannot be
        read: the join is refused before the upgrade). A ``since`` more than ``max_replay``
        behind gets the newest ``max_replay`` messages, after a ``gap`` frame naming what it
        skipped (v1; the plain dialect cannot say it)."""
        settings = self._node.settings
        head = self._session.last_offset
        if since is None:
            after = max(0, head - settings.history_on_join)
        else:
            after = min(max(0, since), head)
            if head - after > settings.max_replay:
                self._gap = (after + 1, head - settings.max_replay)
                after = head - settings.max_replay
        self._after, self.head = after, head
        self._first_page = await self._page(after, head)

    async def _page(self, after: int, up_to: int) -> list[ChatMessage]:
        end = min(up_to, after + self._node.settings.replay_page_messages)
        return await self._node.hub.history(self._session, after, end)

    async def replay(self) -> None:
        """Send the history planned by :meth:`prepare`, then go live (hub Rule 3), in pages
        of ``replay_page_messages`` read as the member takes them: after each
        ``member.replay_page_bytes`` of frames it waits for ``member.writable()``. So what
        a replay holds is a page and what the member queues, whatever its length. Returns
        early, the seat not live, if the member closes meanwhile; a page the backends cannot
        give raises ``Unavailable``."""
        member, hub, room_id = self._member, self._node.hub, self.room_id
        head = self.head
        member.notify(
            frames.Joined(
                room_id, member.user, head, head - self._after, self._node.settings.node_id
            )
        )
        if self._gap is not None:
            member.notify(frames.Gap(room_id, *self._gap))
        page, self._first_page = self._first_page, []
        if not await self._send_history(self._after, head, page):
            return
        member.notify(frames.Live(room_id, head))
        sent_up_to = head
        while True:
            if not await member.writable():
                return
            if hub.go_live(
                self._session, self._seat, sent_up_to=sent_up_to, max_bytes=member.replay_page_bytes
            ):
                return
            # the live messages that queued meanwhile were dropped (hub Rule 3): from history
            skipped_to = self._seat.skipped_to
            if not await self._send_history(sent_up_to, skipped_to, []):
                return
            sent_up_to = skipped_to

    async def _send_history(self, after: int, up_to: int, page: list[ChatMessage]) -> bool:
        """Send ``(after, up_to]``, ``page`` being its start if already loaded; False if the
        member closed meanwhile."""
        member = self._member
        budget = member.replay_page_bytes
        queued = 0
        while after < up_to:
            if not page:
                page = await self._page(after, up_to)
            for message in page:
                queued += member.deliver_history(message)
                if queued >= budget:
                    queued = 0
                    if not await member.writable():
                        return False
            after = min(up_to, after + self._node.settings.replay_page_messages)
            page = []
        return True

    async def send(self, text: str, client_id: str | None = None) -> ChatMessage:
        """Publish a validated message text; raise ``RateLimited`` or ``Unavailable``. A
        ``client_id`` the member already sent in this room within the dedup window gets the
        earlier message back, nothing new is stored (the way to retry a send)."""
        wait_s = await self._limits.messages.take(self._member.user)
        if wait_s:
            raise RateLimited(
                f"too many messages; at most {self._node.settings.rate_messages_per_s:g}/s"
                " per user",
                retry_after_s=wait_s,
            )
        draft = Draft(self.room_id, self._member.user, text, now_ms(), client_id)
        bus = self._node.backends.bus
        try:
            return await bus.publish(draft)
        except OffsetUnknown:
            await self._node.hub.restore(self.room_id)
            return await bus.publish(draft)

    async def refresh(self, token: str, *, current: auth.Claims) -> auth.Claims:
        """The claims of ``token`` if it may replace the connection's token (``current``):
        valid, of the same account, and expiring later. Otherwise ``Unauthorized``: the
        connection keeps its token."""
        claims = await self._node.authenticate(token)
        if claims.user != self._member.user or claims.account_id != current.account_id:
            raise Unauthorized(
                "a refresh token must be for the user the connection joined as",
                code="token_invalid",
            )
        if claims.expires_at_s <= current.expires_at_s:
            raise Unauthorized(
                "a refresh token must expire later than the connection's token",
                code="token_invalid",
            )
        return claims

    async def ping(self) -> None:
        """Allow a v1 ``ping``; raise ``RateLimited`` past the user's ping rate."""
        wait_s = await self._limits.pings.take(self._member.user)
        if wait_s:
            rate = self._limits.pings.rate
            raise RateLimited(
                f"too many pings; at most {rate.per_s:g}/s per user", retry_after_s=wait_s
            )

    async def typing(self) -> None:
        """Tell the room the member is typing: at most once per ``typing_interval_s`` per
        user and room; the rest are dropped silently."""
        if await self._limits.typing.take(self._typing_key):
            return
        await self._node._signal(self.room_id, frames.typing_event(self.room_id, self._member.user))
