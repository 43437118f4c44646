"""A fuzz test of every REST route against a real node: whatever the body, the query string
or the path, the answer is a 2xx-4xx with a JSON error body (a stable code), never a 500, and
the node logs no error.

Driven by ``chatnode.edge.rest.ROUTES``: each route's path comes from its own pattern
(``hypothesis.strategies.from_regex``, with a real room id in a ``room`` group half the time),
and its query parameters are the names its handler reads (found in the handler's source:
``.get("name")``) plus the API's other names and random ones, so routes added later are fuzzed
with no change here. Values are integers of any size (the 64-bit edges often), text with lone
surrogates (percent-encoded as the bytes ``surrogatepass`` gives), floats and garbage; bodies
are JSON (nested deep, lone-surrogate escapes, huge integers, the API's field names with
values that pass the first checks) or raw bytes. Each request is also sent with each of its
query parameters alone, so that one checked first does not hide another.

CI runs a fixed budget, reproducibly (a fixed seed per route): ``FUZZ_EXAMPLES`` examples
per route (``CHATNODE_FUZZ_EXAMPLES``, default 60: about five seconds). To search longer, and
with a new seed each run::

    CHATNODE_FUZZ_EXAMPLES=5000 CHATNODE_FUZZ_RANDOM=1 .venv/bin/pytest tests/security/test_fuzz_rest.py
"""

from __future__ import annotations

import http.client
import inspect
import json
import logging
import os
import re
import zlib
from pathlib import Path
from urllib.parse import quote

import pytest
import trio
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from chatnode.edge.rest import ROUTES, Route
from tests.e2e.harness import api_client, running_node
from tests.security.support import node_env_config

FUZZ_EXAMPLES = int(os.environ.get("CHATNODE_FUZZ_EXAMPLES", "60"))
FUZZ_RANDOM = os.environ.get("CHATNODE_FUZZ_RANDOM", "") not in ("", "0")

PARAMS = ["after", "limit", "before", "q", "chatroom", "user", "from", "to", "since", "name"]
FIELDS = [
    "name",
    "password",
    "message",
    "token",
    "type",
    "id",
    "chatroom",
    "user",
    "visibility",
    "members",
    "role",
]

surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
nasty_text = st.text(
    st.one_of(st.characters(codec=None), surrogates, st.sampled_from("\x00\\\"'%&=?#/ \t\n")),
    max_size=40,
)
integers = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1]),
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**19, 10**30]),
)
param_values = st.one_of(
    integers.map(str),
    integers.map(str),
    nasty_text,
    st.floats().map(str),
    st.sampled_from(["", " 1", "1_000", "+5", "0x10", "\u0661\u0662", "1e3", "9" * 5000]),
)
json_scalars = st.one_of(st.none(), st.booleans(), integers, st.floats(), nasty_text)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), nasty_text), children, max_size=4),
    ),
    max_leaves=12,
)
# Values that get past the first checks, so the fuzz reaches what lies behind them.
plausible = {
    "name": st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True),
    "password": st.text(st.one_of(st.characters(codec=None), surrogates), min_size=8, max_size=20),
    "message": nasty_text,
    "type": st.sampled_from(["send", "ping", "typing", "refresh"]),
    "user": st.sampled_from(["fuzzer", "other", "FUZZER", "nobody"]),
    "visibility": st.sampled_from(["public", "private", "direct"]),
    "role": st.sampled_from(["member", "admin", "owner"]),
    "members": st.lists(st.sampled_from(["fuzzer", "other", "nobody"]), max_size=4),
}
field_values = {
    field: st.one_of(
        plausible.get(field, nasty_text), plausible.get(field, nasty_text), json_values
    )
    for field in FIELDS
}
json_bodies = st.one_of(
    st.fixed_dictionaries({}, optional=field_values).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({}, optional=field_values).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=1, max_value=40_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=12_000).map(lambda n: b'{"a":' * n + b"0" + b"}" * n),
    st.binary(max_size=200),
    nasty_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
)


def encode(text: str) -> str:
    """Percent-encode as a client would, lone surrogates as the bytes surrogatepass gives."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


Request = tuple[str, str, dict[str, str], bytes | None]


def params_read_by(route: Route) -> list[str]:
    """The query parameters the route's handler reads (``.get("name")`` in its source)."""
    source = inspect.getsource(route.handler)
    return sorted(set(re.findall(r"""\.get\(\s*["']([A-Za-z_][A-Za-z0-9_]*)["']""", source)))


@st.composite
def requests(draw: st.DrawFn, route: Route, room: int, token: str) -> list[Request]:
    """One generated request, and the same with each of its query parameters alone (so that
    a parameter checked first does not hide what another one would do)."""
    path = draw(st.from_regex(route.pattern, fullmatch=True))
    match = route.pattern.fullmatch(path)
    if match is not None and "room" in route.pattern.groupindex and draw(st.booleans()):
        start, end = match.span("room")
        path = path[:start] + str(room) + path[end:]
    path = quote(path.encode("utf-8", "surrogatepass"), safe="/")
    own = params_read_by(route)
    names = st.one_of(st.sampled_from(PARAMS), nasty_text)
    query = list(draw(st.dictionaries(st.sampled_from(own), param_values)).items()) if own else []
    if "q" in own and draw(st.booleans()):
        query.append(("q", draw(st.sampled_from(["hello", "x", "room"]))))
    query += draw(st.lists(st.tuples(names, param_values), max_size=2))
    headers = {}
    auth = draw(st.sampled_from(["token", "token", "none", "garbage"]))
    if auth == "token":
        headers["Authorization"] = f"Bearer {token}"
    elif auth == "garbage":
        headers["Authorization"] = "Bearer " + encode(draw(nasty_text))
    body = draw(st.one_of(st.none(), json_bodies)) if route.method != "GET" else None
    if body is not None:
        headers["Content-Type"] = "application/json"
    queries = [query] + ([[pair] for pair in query] if len(query) > 1 else [])
    return [
        (
            route.method,
            path + ("?" + "&".join(f"{encode(k)}={encode(v)}" for k, v in q) if q else ""),
            headers,
            body,
        )
        for q in queries
    ]


def fuzz_route(port: int, route: Route, room: int, token: str) -> int:
    """Run the route's examples (in a worker thread, against the node on ``port``); return
    how many were sent."""
    sent = 0

    @settings(
        max_examples=FUZZ_EXAMPLES,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests(route, room, token))
    def check(variants: list[Request]) -> None:
        nonlocal sent
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for method, path, headers, body in variants:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                status, payload = response.status, response.read()
                sent += 1
                what = (
                    f"{method} {path[:300]} body={(body or b'')[:200]!r}"
                    f" -> {status} {payload[:300]!r}"
                )
                assert status < 500, what
                if status >= 400:
                    error = json.loads(payload)["error"]
                    assert isinstance(error["code"], str) and error["code"], what
                if response.will_close:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        finally:
            conn.close()

    if not FUZZ_RANDOM:
        check = seed(zlib.crc32(f"{route.method} {route.pattern.pattern}".encode()))(check)
    check()
    return sent


async def test_no_rest_input_gets_a_500(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="chatnode")
    async with running_node(node_env_config(str(tmp_path))) as node, api_client(node) as api:
        token = await api.user_with_token("fuzzer")  # not an admin: DELETE /v1/users is 403
        await api.user_with_token("other")  # a user to name in direct rooms, members, bans
        room = await api.create_room(token)
        total, failures = 0, []
        for route in ROUTES:  # every route, so one report names every failing one
            try:
                total += await trio.to_thread.run_sync(fuzz_route, node.port, route, room, token)
            except AssertionError as exc:
                failures.append(f"{route.method} {route.pattern.pattern}: {exc}")
        print(
            f"\n[security] REST fuzz: {total} requests over {len(ROUTES)} routes;"
            f" {len(failures)} routes failed"
        )
    assert not failures, "\n".join(failures)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage()[:300] for r in errors]
