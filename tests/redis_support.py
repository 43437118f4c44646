"""Redis helpers of the tests: a client with the commands the tests inspect Redis with, and a
bus for tests that publish straight to rooms no API call created."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import NamedTuple

import attrs

from chatnode.adapters.redis.bus import RedisBus
from chatnode.adapters.redis.client import RespClient
from chatnode.core import errors
from chatnode.core.models import ChatMessage, Draft
from chatnode.wire.resp import Arg, Reply


class StreamEntry(NamedTuple):
    identifier: bytes
    field_values: dict[bytes, bytes]


def _bytes(reply: Reply) -> bytes:
    assert isinstance(reply, bytes), reply
    return reply


def _int(reply: Reply) -> int:
    assert isinstance(reply, int), reply
    return reply


def _list(reply: Reply) -> list[Reply]:
    assert isinstance(reply, list), reply
    return reply


class RedisAdmin(RespClient):
    """A :class:`RespClient` with typed shortcuts for the commands tests inspect Redis with."""

    async def get(self, key: Arg) -> bytes | None:
        reply = await self.call("GET", key)
        return None if reply is None else _bytes(reply)

    async def set(self, key: Arg, value: Arg, *, px: int | None = None) -> None:
        await self.call("SET", key, value, *(["PX", px] if px is not None else []))

    async def delete(self, keys: Sequence[Arg]) -> int:
        return _int(await self.call("DEL", *keys)) if keys else 0

    async def pttl(self, key: Arg) -> int:
        return _int(await self.call("PTTL", key))

    async def ttl(self, key: Arg) -> int:
        return _int(await self.call("TTL", key))

    async def xlen(self, key: Arg) -> int:
        return _int(await self.call("XLEN", key))

    async def xadd(self, key: Arg, fields: Mapping[str, Arg]) -> bytes:
        flat = [part for field, value in fields.items() for part in (field, value)]
        return _bytes(await self.call("XADD", key, "*", *flat))

    async def xrange(self, key: Arg, *, count: int | None = None) -> list[StreamEntry]:
        limit: list[Arg] = ["COUNT", count] if count is not None else []
        entries = []
        for entry in _list(await self.call("XRANGE", key, "-", "+", *limit)):
            identifier, fields = _list(entry)
            flat = [_bytes(part) for part in _list(fields)]
            entries.append(
                StreamEntry(_bytes(identifier), dict(zip(flat[::2], flat[1::2], strict=True)))
            )
        return entries

    async def hkeys(self, key: Arg) -> list[bytes]:
        return [_bytes(field) for field in _list(await self.call("HKEYS", key))]

    async def publish(self, channel: Arg, message: Arg) -> int:
        return _int(await self.call("PUBLISH", channel, message))

    async def pubsub_numsub(self, channel: Arg) -> int:
        _, count = _list(await self.call("PUBSUB", "NUMSUB", channel))
        return _int(count)

    async def client_list(self, *, kind: str | None = None) -> list[dict[str, str]]:
        """``CLIENT LIST [TYPE kind]``, one dict of fields per connection."""
        raw = await self.call("CLIENT", "LIST", *(["TYPE", kind] if kind else []))
        return [
            dict(field.split("=", 1) for field in line.split(" ") if "=" in field)
            for line in _bytes(raw).decode().splitlines()
        ]

    async def client_kill(self, client_id: int | str) -> None:
        await self.call("CLIENT", "KILL", "ID", client_id)

    async def kill_clients_named(self, name: str, *, kind: str | None = None) -> int:
        """Kill every connection named ``name``; how many there were."""
        ids = [info["id"] for info in await self.client_list(kind=kind) if info["name"] == name]
        for client_id in ids:
            await self.client_kill(client_id)
        return len(ids)

    async def scan_iter(self, match: str) -> AsyncIterator[bytes]:
        cursor: Reply = b"0"
        while True:
            cursor, keys = _list(
                await self.call("SCAN", _bytes(cursor), "MATCH", match, "COUNT", 1000)
            )
            for key in _list(keys):
                yield _bytes(key)
            if cursor == b"0":
                return

    async def delete_prefix(self, prefix: str) -> None:
        """Delete every key under ``prefix:``."""
        keys = [key async for key in self.scan_iter(f"{prefix}:*")]
        for start in range(0, len(keys), 1000):
            await self.delete(keys[start : start + 1000])


@attrs.define(eq=False)
class OpeningRedisBus(RedisBus):
    """A :class:`RedisBus` whose ``publish`` starts a room it has no offset of at 0, as
    creating the room through the API does (``ChatNode.create_room``); the tests of what the
    bus does with a lost offset use :class:`RedisBus` itself."""

    async def publish(self, draft: Draft) -> ChatMessage:
        try:
            return await super().publish(draft)
        except errors.OffsetUnknown:
            await self.restore(draft.room_id, last_offset=0)
            return await super().publish(draft)
