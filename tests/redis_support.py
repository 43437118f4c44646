"""A Redis bus for tests that publish straight to rooms no API call created."""

from __future__ import annotations

import attrs

from chatnode.adapters.redis.bus import RedisBus
from chatnode.core import errors
from chatnode.core.models import ChatMessage, Draft


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
