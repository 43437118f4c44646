"""The push notifications' webhook over HTTP(S): :class:`HttpWebhook` (``ports.Webhook``).

Rules:

1. **One client.** Requests go through :class:`~chatnode.adapters.elasticsearch.http.HttpPool`
   (h11, keep-alive, ``https`` over ``trio.SSLStream`` with the standard library's default
   TLS context), to the URL's path and query.
2. **Every request has a deadline.** A POST not answered within ``timeout_s`` is cancelled
   (its connection closed) and raises ``Unavailable``, as a refused or broken connection
   does; any answer is returned as its status, for the caller to judge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import attrs
import trio

from chatnode.core import ports
from chatnode.core.errors import Unavailable

from .elasticsearch.http import HttpPool, HttpUnreachable


class HttpWebhook:
    """POSTs to ``url`` (``http://`` or ``https://``; ``ValueError`` otherwise)."""

    def __init__(self, url: str, *, timeout_s: float, max_idle: int = 8) -> None:
        parts = urlsplit(url)
        self._pool = attrs.evolve(HttpPool.from_url(url, max_idle=max_idle), base_path="")
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout_s = timeout_s

    async def post(self, body: bytes) -> int:
        try:
            with trio.fail_after(self.timeout_s):
                response = await self._pool.request("POST", self._target, body)
        except HttpUnreachable as exc:
            raise Unavailable(f"push webhook: {exc}") from None
        except trio.TooSlowError:
            raise Unavailable(f"push webhook: no answer within {self.timeout_s:g}s") from None
        return response.status

    async def aclose(self) -> None:
        await self._pool.aclose()


if TYPE_CHECKING:  # mypy proves the adapter implements its port

    def _implements_port() -> ports.Webhook:
        return HttpWebhook("http://localhost", timeout_s=1.0)
