"""The REST API (README "API" and docs/protocol.md): routing and handlers.

Every handler returns a Response; every ``ChatError`` becomes its status and JSON error body in
``edge/errors.py``; any other exception is logged and answered with 500 (the node lives on).

The cacheable reads (rooms list, room users) keep their encoded answer in an
:class:`AnswerCache` and reuse it while the node hands back an equal value: the node's caches
decide how fresh a value is, this only skips encoding it again. Encoding the 100-room page
would be ~18 % of a ``GET /v1/chatrooms`` (docs/benchmarks.md, profile 5).
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable

import attrs

from chatnode.core import auth, errors, validation
from chatnode.core.models import Listed, Member, Room, SearchQuery
from chatnode.edge.http import error_response
from chatnode.edge.metrics import Metrics
from chatnode.node import presence as presence_rules
from chatnode.node.rooms import Activity
from chatnode.node.service import ChatNode
from chatnode.wire.http import Request, Response

log = logging.getLogger(__name__)

RouteHandler = Callable[["Api", Request, re.Match[str]], Awaitable[Response]]
ENTRY_OVERHEAD_BYTES = 256


@attrs.frozen
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: RouteHandler


def room_json(room: Room) -> dict[str, object]:
    return {
        "id": room.id,
        "name": room.name,
        "created_at": room.created_at_ms,
        "visibility": room.visibility,
    }


def listed_json(listed: Listed) -> dict[str, object]:
    return {**room_json(listed.room), "member_count": listed.member_count}


def member_json(member: Member) -> dict[str, object]:
    return {"user": member.user, "role": member.role, "joined_at": member.joined_at_ms}


def activity_json(activity: Activity) -> dict[str, object]:
    room, last = activity.room, activity.last_message
    return {
        "id": room.id,
        "name": room.name,
        "visibility": room.visibility,
        "last_offset": activity.last_offset,
        "last_message": None if last is None else last.fields(),
        "read_offset": activity.read_offset,
        "unread": activity.unread,
    }


class AnswerCache:
    """Encoded JSON answers by request key, each with the value it encodes; the least recently
    used are evicted past ``max_bytes`` of answers (plus ``ENTRY_OVERHEAD_BYTES`` each: the
    keys come from clients). The values are not counted: they are the objects the node's
    caches hold anyway.

    Rule: an answer is reused only for a value equal (``==``) to the one it was encoded from,
    so it can never be out of date. The comparison is cheap when the node's cache hands back
    the same objects again (list equality checks identity first: 0.1 µs for 100 rooms, 9 µs
    for equal copies), so an entry keeps the newest value it was compared with.
    """

    def __init__(self, max_bytes: int = 4 << 20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[object, bytes]] = OrderedDict()
        self._bytes = 0

    def body(self, key: Hashable, value: object, encode: Callable[[], object]) -> bytes:
        """The JSON of ``encode()``, encoded now unless ``value`` equals the cached one's."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] == value:
            # Keep the newer value: the next one is most likely made of the same objects.
            self._entries[key] = (value, entry[1])
            self._entries.move_to_end(key)
            return entry[1]
        body = json.dumps(encode(), ensure_ascii=False).encode()
        if entry is not None:
            del self._entries[key]
            self._bytes -= ENTRY_OVERHEAD_BYTES + len(entry[1])
        self._entries[key] = (value, body)
        self._bytes += ENTRY_OVERHEAD_BYTES + len(body)
        while self._bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= ENTRY_OVERHEAD_BYTES + len(evicted)
        return body


class Api:
    def __init__(self, node: ChatNode, metrics: Metrics) -> None:
        self.node = node
        self.metrics = metrics
        self.answers = AnswerCache()

    async def handle(self, request: Request) -> Response:
        self.metrics.http_requests += 1
        try:
            route, match = self.route(request)
            return await route.handler(self, request, match)
        except errors.ChatError as exc:
            return error_response(exc)
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.path)
            return error_response(errors.ChatError("internal error; the node logged it"))

    def route(self, request: Request) -> tuple[Route, re.Match[str]]:
        allowed: list[str] = []
        for route in ROUTES:
            match = route.pattern.fullmatch(request.path)
            if match is None:
                continue
            if route.method == request.method:
                return route, match
            allowed.append(route.method)
        if allowed:
            raise errors.MethodNotAllowed(
                f"{request.method} is not allowed on {request.path}; use {', '.join(allowed)}",
                allowed=tuple(allowed),
            )
        raise errors.NotFound(f"no route for {request.path}", code="route_not_found")

    async def claims(self, request: Request) -> auth.Claims:
        return await self.node.authenticate(request.bearer_token)

    # -- handlers -------------------------------------------------------------------------------

    async def list_rooms(self, request: Request, match: re.Match[str]) -> Response:
        claims = await self.claims(request)
        limit = validation.positive_int(
            request.query.get("limit"),
            "limit",
            default=100,
            maximum=self.node.settings.limits.max_page,
        )
        after = validation.optional_int(request.query.get("after"), "after") or 0
        rooms = await self.node.visible_rooms(claims, after_id=after, limit=limit)
        body = self.answers.body(
            ("rooms", claims.user, after, limit),
            rooms,
            lambda: {
                "ids": [r.room.id for r in rooms],
                "chatrooms": [listed_json(r) for r in rooms],
                "next": rooms[-1].room.id if len(rooms) == limit else None,
            },
        )
        return Response(200, body)

    async def create_room(self, request: Request, match: re.Match[str]) -> Response:
        claims = await self.claims(request)
        body = request.json(required=False)
        room = await self.node.create_room(
            body.get("name"),
            claims=claims,
            visibility=body.get("visibility"),
            members=body.get("members"),
        )
        return Response.json(201, room_json(room))

    async def direct_room(self, request: Request, match: re.Match[str]) -> Response:
        claims = await self.claims(request)
        room, made = await self.node.direct_room(claims, request.json().get("user"))
        return Response.json(201 if made else 200, room_json(room))

    async def my_rooms(self, request: Request, match: re.Match[str]) -> Response:
        claims = await self.claims(request)
        limit = validation.positive_int(
            request.query.get("limit"),
            "limit",
            default=100,
            maximum=self.node.settings.limits.max_page,
        )
        rooms = await self.node.my_rooms(claims, limit=limit)
        total = sum(a.unread for a in rooms)  # the body stays a list: the total is a header
        return Response.json(
            200, [activity_json(a) for a in rooms], headers=(("Chatnode-Unread", str(total)),)
        )

    async def receipts(self, request: Request, match: re.Match[str]) -> Response:
        claims = await self.claims(request)
        cursors = await self.node.receipts(int(match["room"]), claims)
        return Response.json(
            200,
            {
                "receipts": [
                    {"user": c.user, "delivered": c.delivered, "read": c.read} for c in cursors
                ]
            },
        )

    async def user_presence(self, request: Request, match: re.Match[str]) -> Response:
        """``GET /v1/users/{name}``: the caller's or a contact's presence
        (``node/presence.py`` rule 1)."""
        claims = await self.claims(request)
        node = self.node
        name = validation.user_name(match["name"], node.settings.limits)
        state = await presence_rules.lookup(
            node.backends.directory,
            node.backends.presence,
            claims,
            name,
            limit=node.settings.max_connection_rooms,
        )
        return Response.json(
            200, {"name": name, "online": state.online, "last_seen": state.last_seen_ms}
        )

    async def members(self, request: Request, match: re.Match[str]) -> Response:
        claims = await self.claims(request)
        members = await self.node.room_members(int(match["room"]), claims)
        return Response.json(200, [member_json(m) for m in members])

    async def add_member(self, request: Request, match: re.Match[str]) -> Response:
        claims = await self.claims(request)
        room_id = int(match["room"])
        body = request.json()
        member, added = await self.node.add_member(
            claims, room_id, body.get("user"), body.get("role")
        )
        return Response.json(
            201 if added else 200, {"chatroom": room_id, **member_json(member), "added": added}
        )

    async def remove_member(self, request: Request, match: re.Match[str]) -> Response:
        claims = await self.claims(request)
        room_id = int(match["room"])
        user = validation.user_name(match["user"], self.node.settings.limits)
        removed = await self.node.remove_member(claims, room_id, user)
        return Response.json(200, {"chatroom": room_id, "user": user, "removed": removed})

    async def ban(self, request: Request, match: re.Match[str]) -> Response:
        claims = await self.claims(request)
        room_id = int(match["room"])
        body = request.json()
        banned = await self.node.ban(claims, room_id, body.get("user"))
        user = validation.user_name(body.get("user"), self.node.settings.limits)
        return Response.json(200, {"chatroom": room_id, "user": user, "banned": banned})

    async def unban(self, request: Request, match: re.Match[str]) -> Response:
        claims = await self.claims(request)
        room_id = int(match["room"])
        user = validation.user_name(match["user"], self.node.settings.limits)
        lifted = await self.node.unban(claims, room_id, user)
        return Response.json(200, {"chatroom": room_id, "user": user, "unbanned": lifted})

    async def bans(self, request: Request, match: re.Match[str]) -> Response:
        claims = await self.claims(request)
        names = await self.node.bans(claims, int(match["room"]))
        return Response.json(200, {"bans": names})

    async def room_users(self, request: Request, match: re.Match[str]) -> Response:
        claims = await self.claims(request)
        room_id = int(match["room"])
        members, online = await self.node.room_users(room_id, claims)
        body = self.answers.body(
            ("users", room_id), (members, online), lambda: {"users": members, "online": online}
        )
        return Response(200, body)

    async def create_user(self, request: Request, match: re.Match[str]) -> Response:
        body = request.json()
        user = await self.node.create_user(
            body.get("name"), body.get("password"), client=request.client
        )
        return Response.json(201, {"name": user.name, "created_at": user.created_at_ms})

    async def delete_users(self, request: Request, match: re.Match[str]) -> Response:
        deleted = await self.node.delete_all_users(await self.claims(request))
        return Response.json(200, {"deleted": deleted})

    async def create_token(self, request: Request, match: re.Match[str]) -> Response:
        body = request.json()
        token, expires_at_s = await self.node.issue_token(
            body.get("name"), body.get("password"), client=request.client
        )
        return Response.json(
            200, {"token": token, "token_type": "Bearer", "expires_at": expires_at_s}
        )

    async def delete_token(self, request: Request, match: re.Match[str]) -> Response:
        await self.node.sign_out(await self.claims(request))
        return Response(204)

    async def change_password(self, request: Request, match: re.Match[str]) -> Response:
        claims = await self.claims(request)
        body = request.json()
        token, expires_at_s = await self.node.change_password(
            claims, body.get("password"), body.get("new_password"), client=request.client
        )
        return Response.json(
            200, {"token": token, "token_type": "Bearer", "expires_at": expires_at_s}
        )

    async def create_ticket(self, request: Request, match: re.Match[str]) -> Response:
        ticket, expires_at_s = await self.node.issue_ticket(request.bearer_token)
        return Response.json(201, {"ticket": ticket, "expires_at": expires_at_s})

    async def history(self, request: Request, match: re.Match[str]) -> Response:
        claims = await self.claims(request)
        limit = validation.positive_int(
            request.query.get("limit"),
            "limit",
            default=50,
            maximum=self.node.settings.limits.max_page,
        )
        before = validation.optional_int(request.query.get("before"), "before", minimum=1)
        messages = await self.node.history(
            int(match["room"]), before=before, limit=limit, claims=claims
        )
        return Response.json(
            200,
            {
                "messages": [m.fields() for m in messages],
                "next_before": messages[0].offset if messages and messages[0].offset > 1 else None,
            },
        )

    async def search(self, request: Request, match: re.Match[str]) -> Response:
        claims = await self.claims(request)
        q = request.query
        text = q.get("q", "").strip()
        if not text:
            raise errors.BadRequest(
                "q (the words to search for) is required", code="invalid_parameter"
            )
        query = SearchQuery(
            text=text[:500],
            room_id=validation.optional_int(q.get("chatroom"), "chatroom", minimum=1),
            user=q.get("user") or None,
            from_ms=validation.optional_int(q.get("from"), "from"),
            to_ms=validation.optional_int(q.get("to"), "to"),
            limit=validation.positive_int(q.get("limit"), "limit", default=20, maximum=100),
        )
        hits = await self.node.search(query, claims)
        return Response.json(
            200, {"hits": [{**h.message.fields(), "score": h.score} for h in hits]}
        )

    async def join_without_upgrade(self, request: Request, match: re.Match[str]) -> Response:
        return Response.json(
            426,
            {
                "error": {
                    "code": "upgrade_required",
                    "message": "this route is a WebSocket: send Upgrade: websocket",
                }
            },
            headers=(("Upgrade", "websocket"),),
        )

    async def healthz(self, request: Request, match: re.Match[str]) -> Response:
        return Response.json(200, {"status": "ok", "node": self.node.settings.node_id})

    async def readyz(self, request: Request, match: re.Match[str]) -> Response:
        checks = await self.node.check()
        ready = all(v == "ok" for v in checks.values()) and not self.metrics.draining
        return Response.json(
            200 if ready else 503,
            {"ready": ready, "checks": checks, "draining": self.metrics.draining},
        )

    async def metrics_text(self, request: Request, match: re.Match[str]) -> Response:
        return Response(
            200, self.metrics.render(self.node).encode(), content_type="text/plain; version=0.0.4"
        )


def _route(method: str, pattern: str, handler: RouteHandler) -> Route:
    return Route(method, re.compile(pattern), handler)


ROOM = r"/v1/chatrooms/(?P<room>[1-9][0-9]{0,17})"
ROUTES: tuple[Route, ...] = (
    _route("GET", "/v1/chatrooms", Api.list_rooms),
    _route("POST", "/v1/chatrooms", Api.create_room),
    _route("POST", "/v1/chatrooms/users", Api.create_user),
    _route("GET", ROOM + "/users", Api.room_users),
    _route("GET", ROOM + "/members", Api.members),
    _route("GET", ROOM + "/receipts", Api.receipts),
    _route("POST", ROOM + "/members", Api.add_member),
    _route("GET", ROOM + "/bans", Api.bans),
    _route("POST", ROOM + "/bans", Api.ban),
    _route("DELETE", ROOM + "/bans/(?P<user>[^/]+)", Api.unban),
    _route("GET", ROOM + "/messages", Api.history),
    _route("GET", ROOM + "/join", Api.join_without_upgrade),
    _route("DELETE", ROOM + "/members/(?P<user>[^/]+)", Api.remove_member),
    _route("POST", "/v1/direct", Api.direct_room),
    _route("GET", "/v1/me/chatrooms", Api.my_rooms),
    _route("POST", "/v1/users", Api.create_user),
    _route("DELETE", "/v1/users", Api.delete_users),
    _route("GET", "/v1/users/(?P<name>[^/]+)", Api.user_presence),
    _route("POST", "/v1/tokens", Api.create_token),
    _route("DELETE", "/v1/tokens/current", Api.delete_token),
    _route("PUT", "/v1/users/me/password", Api.change_password),
    _route("POST", "/v1/tickets", Api.create_ticket),
    _route("GET", "/v1/messages/search", Api.search),
    _route("GET", "/v1/connect", Api.join_without_upgrade),
    _route("GET", "/healthz", Api.healthz),
    _route("GET", "/readyz", Api.readyz),
    _route("GET", "/metrics", Api.metrics_text),
)
