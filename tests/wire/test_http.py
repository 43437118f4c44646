"""The HTTP wire layer (``wire/http.py``): the fast path read against h11, responses as h11
writes them, the client's address."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatnode.wire.http import (
    Request,
    Response,
    TrustedProxies,
    parse_simple_head,
    parse_target,
    response_bytes,
)


def h11_read(head: bytes) -> tuple[Request, bool]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head + b"\r\n\r\n")
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    path, query = parse_target(event.target)
    headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
    conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    request = Request(event.method.decode(), path, query, headers)
    return request, conn.our_state is not h11.MUST_CLOSE


_token = st.text("abcxyzABC-_.!~019", min_size=1, max_size=8)
_value = st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF), max_size=12)


@given(
    method=st.sampled_from(["GET", "HEAD", "DELETE", "OPTIONS"]),
    path=st.lists(st.text("abc%20-._~:@!$&'()*+,;=", max_size=6), max_size=3),
    query=st.none() | st.text("ab=&%2B+", max_size=10),
    version=st.sampled_from(["1.0", "1.1"]),
    fields=st.lists(
        st.tuples(
            _token
            | st.sampled_from(["Connection", "Content-Length", "Upgrade", "Transfer-Encoding"]),
            _value | st.sampled_from(["close", "keep-alive", "0", "Upgrade, close", "chunked"]),
            st.sampled_from(["", " ", "\t "]),
            st.sampled_from(["", " "]),
        ),
        max_size=5,
    ),
)
def test_the_fast_parser_reads_simple_heads_as_h11_does(
    method: str, path: list[str], query: str | None, version: str, fields: Any
) -> None:
    target = "/" + "/".join(path) + ("" if query is None else "?" + query)
    lines = [f"{method} {target} HTTP/{version}", "Host: example"]
    lines += [f"{name}:{before}{value}{after}" for name, value, before, after in fields]
    head = "\r\n".join(lines).encode("latin-1")
    fast = parse_simple_head(head)
    content_lengths = [value for name, value, *_ in fields if name.lower() == "content-length"]
    two_hosts = any(name.lower() == "host" for name, *_ in fields)
    chunked = any(name.lower() == "transfer-encoding" for name, *_ in fields)
    if content_lengths not in ([], ["0"]) or two_hosts or chunked or target.startswith("//"):
        assert fast is None  # h11 reads it (or refuses it)
    else:
        assert fast == h11_read(head)


@pytest.mark.parametrize(
    ("response", "close", "request_method"),
    [
        (Response.json(200, {"a": "é"}), False, b"GET"),
        (
            Response(404, b'{"error": {}}', headers=(("Retry-After", "3"), ("Allow", "GET"))),
            True,
            b"GET",
        ),
        (Response(204), False, b"DELETE"),
        (Response(200, b"text", content_type="text/plain; version=0.0.4"), False, b"GET"),
        (Response(200, b"{}"), False, b"HEAD"),
    ],
)
def test_responses_are_what_h11_would_send(
    response: Response, close: bool, request_method: bytes
) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"%s / HTTP/1.1\r\nHost: x\r\n\r\n" % request_method)
    conn.next_event()
    headers = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body)))]
    headers += [*response.headers, *([("Connection", "close")] if close else [])]
    reason = HTTPStatus(response.status).phrase
    head_only = request_method == b"HEAD"
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    if response.body and not head_only:
        data = (data or b"") + (conn.send(h11.Data(data=response.body)) or b"")
    assert response_bytes(response, close=close, head_only=head_only) == data


def test_the_client_address_is_the_peers_unless_a_trusted_proxy_forwarded_it() -> None:
    proxies = TrustedProxies.parse("127.0.0.1/8, ::1")
    forwarded = {"x-forwarded-for": "203.0.113.9, 10.0.0.1", "x-real-ip": "203.0.113.7"}

    assert proxies.client("198.51.100.4", forwarded) == "198.51.100.4"  # not a proxy: ignored
    assert proxies.client("127.0.0.1", forwarded) == "203.0.113.7"  # nginx's X-Real-IP
    assert proxies.client("::1", {"x-forwarded-for": "203.0.113.9, 127.0.0.2"}) == "203.0.113.9"
    assert proxies.client("127.0.0.1", {}) == "127.0.0.1"
    assert proxies.client("", {}) == "unix"  # a Unix-socket peer that forwarded nothing
    assert proxies.client("", {"x-real-ip": "203.0.113.7"}) == "203.0.113.7"
    assert TrustedProxies().client("127.0.0.1", forwarded) == "127.0.0.1"
