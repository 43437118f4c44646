"""The HTTP wire layer (``wire/http.py``): the fast path read against h11, responses as h11
writes them, the client's address."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import attrs
import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatnode.wire.http import (
    Request,
    Response,
    TrustedProxies,
    check_framing,
    h11_request,
    is_websocket_upgrade,
    parse_simple_head,
    parse_target,
    read_simple,
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


# -- the differential fuzz: one reading of every byte stream (wire/http.py rules 1-2) --------

MAX_HEAD = 16 * 1024
Outcome = list[tuple[str, object]]


def _request_fields(request: Request) -> tuple[object, ...]:
    return (request.method, request.path, request.query, request.headers, request.body)


def read_as_the_edge_does(stream: bytes) -> Outcome:
    """What the edge reads from ``stream`` (``edge/http.py``'s ``_read_request`` without the
    sockets): the fast path while heads are simple, else one request by a fresh h11 fed
    what is left, until a refusal, an upgrade, a close or the end of the bytes."""
    received = bytearray(stream)
    got: Outcome = []
    while received:
        simple = read_simple(received, received.find(b"\r\n\r\n"), MAX_HEAD)
        if simple is not None:
            request, keep_alive = simple
        else:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
            conn.receive_data(bytes(received))
            try:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    return [*got, ("incomplete", None)]
                assert isinstance(event, h11.Request)
                check_framing(event)
                request, keep_alive = h11_request(event)
                if not is_websocket_upgrade(request):
                    body = _h11_body(conn)
                    if body is None:
                        return [*got, ("incomplete", None)]
                    request = attrs.evolve(request, body=body)
            except h11.RemoteProtocolError as exc:
                return [*got, ("refused", exc.error_status_hint)]
            received = bytearray(conn.trailing_data[0])
        got.append(("request", (*_request_fields(request), keep_alive)))
        if not keep_alive or is_websocket_upgrade(request):
            break
    return got


def read_as_h11_does(stream: bytes) -> Outcome:
    """What one h11 connection reads from ``stream``, answering each request as the edge
    does (a response with a Content-Length) and refusing a head that names both framings."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(stream)
    got: Outcome = []
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.trailing_data[0] or conn.their_state is not h11.IDLE:
                    got.append(("incomplete", None))
                return got
            assert isinstance(event, h11.Request)
            check_framing(event)
            request, _ = h11_request(event)
            if is_websocket_upgrade(request):
                got.append(("request", (*_request_fields(request), conn.their_state is h11.DONE)))
                return got
            body = _h11_body(conn)
            if body is None:
                return [*got, ("incomplete", None)]
            conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            keep_alive = conn.our_state is not h11.MUST_CLOSE
            fields = (*_request_fields(request)[:4], body, keep_alive)
            got.append(("request", fields))
            if not keep_alive:
                return got
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        return [*got, ("refused", exc.error_status_hint)]


def _h11_body(conn: h11.Connection) -> bytes | None:
    chunks = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        assert isinstance(event, h11.Data)
        chunks.append(bytes(event.data))


def _mostly(usual: list[str], odd: list[str]) -> st.SearchStrategy[str]:
    """One of ``usual`` most of the time (listed first, so examples shrink to them), else
    one of ``odd``."""
    return st.sampled_from(usual * 16 + odd)


_sp = _mostly([" "], ["  ", "\t", ""])
_method = _mostly(["GET", "HEAD", "DELETE", "OPTIONS", "POST", "PUT"], ["get", "G(T", ""])
_target = _mostly(
    ["/", "/v1/chatrooms?after=3&q", "/a%20b?x=%2B+y", "/v1/chatrooms/1/join?user=a"],
    ["//x", "*", "http://h/p?q=1", "/#f", "/a b", "", "/\x7f", "/\xe9"],
)
_version = _mostly(["HTTP/1.1", "HTTP/1.0"], ["HTTP/2.0", "HTTP/1.10", "http/1.1", ""])
_name = _mostly(
    ["X-A", "Accept", "Authorization", "Connection", "Upgrade", "Content-Length", "Host"],
    ["content-LENGTH", "Transfer-Encoding", "X A", "", "Host ", "X\x00"],
)
_value = _mostly(
    ["text/html", "Bearer abc", "keep-alive", "close", "Upgrade", "websocket", "0", "a  b"],
    ["5", "00", "+0", "0, 0", "chunked", "x\x00y", "x\x7fy", "\xe9", " ", "", "a\rb"],
)
_ows = _mostly(["", " "], ["\t", "  ", " \t"])
_header = st.builds(
    lambda name, before, value, after, fold: f"{name}:{before}{value}{after}" + fold,
    _name,
    _ows,
    _value,
    _ows,
    _mostly([""], ["\r\n b", "\r\n\tc", "\r\n "]),
)
_eol = _mostly(["\r\n"], ["\n", "\r"])
_body = _mostly(["", "hello"], ["GET / HTTP/1.1\r\n", "\r\n", "12345678"])
_chunked = _mostly(
    ["3\r\nabc\r\n0\r\n\r\n", "0\r\n\r\n", "2;x=y\r\nab\r\n0\r\nT: v\r\n\r\n"],
    ["5\r\nab", "x\r\n\r\n", "3\r\nabcd\r\n0\r\n\r\n", "-1\r\n\r\n"],
)


@st.composite
def _request(draw: st.DrawFn) -> bytes:
    line = f"{draw(_method)}{draw(_sp)}{draw(_target)}{draw(_sp)}{draw(_version)}"
    headers = draw(st.lists(_header, max_size=4))
    if draw(_mostly(["host"], ["none", "two"])) != "none":
        headers.insert(draw(st.integers(0, len(headers))), "Host: example")
    framing = draw(
        _mostly(
            ["none", "length", "chunked"],
            ["zero", "both", "two lengths", "two equal lengths", "gzip", "chunked twice"],
        )
    )
    body = draw(_body)
    if framing == "length":
        headers.append(f"Content-Length: {len(body)}")
    elif framing == "zero":
        headers.append("Content-Length: 0")
    elif framing == "two lengths":
        headers += [f"Content-Length: {len(body)}", f"Content-Length: {len(body) + 1}"]
    elif framing == "two equal lengths":
        headers += [f"Content-Length: {len(body)}", f"Content-Length: {len(body)}"]
    elif framing in ("chunked", "both", "gzip", "chunked twice"):
        body = draw(_chunked)
        headers.append("Transfer-Encoding: " + ("gzip" if framing == "gzip" else "chunked"))
        if framing == "both":
            headers.append(f"Content-Length: {len(body)}")
        if framing == "chunked twice":
            headers.append("Transfer-Encoding: chunked")
    headers = draw(st.permutations(headers))
    eol = draw(_eol)
    head = eol.join([line, *headers]) + eol + eol
    return (head + body).encode("latin-1")


@settings(max_examples=2000, deadline=None, derandomize=True, database=None)
@given(st.lists(_request(), min_size=1, max_size=4), st.binary(max_size=4))
def test_the_edge_reads_every_byte_stream_as_h11_does(requests: list[bytes], tail: bytes) -> None:
    """Request lines, header whitespace and folding, duplicate and conflicting
    Content-Length, Transfer-Encoding, chunked bodies, pipelined requests and bad bytes:
    the fast path and h11 on one connection read them as one h11 connection does, or both
    refuse. (A fixed budget of examples, the same every run.)"""
    stream = b"".join(requests) + tail
    assert read_as_the_edge_does(stream) == read_as_h11_does(stream)
