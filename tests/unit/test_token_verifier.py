"""TokenVerifier: the claims of verified tokens are remembered, never their expiry's outcome,
never an invalid token, and only so many."""

from __future__ import annotations

from typing import Any

import jwt as pyjwt
import pytest

from chatnode.core import auth
from chatnode.core.errors import Unauthorized

SECRET = "s1-a-secret-of-thirty-two-bytes!!"


def claims(user: str = "ann", *, now_s: int = 1000, ttl_s: int = 60) -> auth.Claims:
    return auth.Claims(
        user,
        False,
        now_s + ttl_s,
        issued_at_ms=now_s * 1000,
        account_id=7,
        token_id=f"id-of-{user}",
    )


def token(user: str = "ann", *, now_s: int = 1000, ttl_s: int = 60) -> str:
    return auth.issue_token(claims(user, now_s=now_s, ttl_s=ttl_s), secret=SECRET)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token PyJWT decodes."""
    seen: list[str] = []
    decode = pyjwt.decode

    def counting(jwt: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(jwt)
        return decode(jwt, *args, **kwargs)

    monkeypatch.setattr(pyjwt, "decode", counting)
    return seen


def test_a_token_is_decoded_once_then_remembered(decodes: list[str]) -> None:
    verifier = auth.TokenVerifier(SECRET)
    t = token()
    first = verifier.verify(t, now_s=1000)
    assert verifier.verify(t, now_s=1030) == first == claims()
    assert decodes == [t]


def test_a_remembered_token_still_expires(decodes: list[str]) -> None:
    verifier = auth.TokenVerifier(SECRET)
    t = token()
    verifier.verify(t, now_s=1059)
    for _ in range(2):  # forgotten at expiry, then expired when decoded again
        with pytest.raises(Unauthorized) as expired:
            verifier.verify(t, now_s=1060)
        assert expired.value.code == "token_expired"
    assert decodes == [t, t]


def test_invalid_tokens_are_refused_every_time_and_never_remembered(decodes: list[str]) -> None:
    verifier = auth.TokenVerifier(SECRET)
    t = token()
    verifier.verify(t, now_s=1000)
    forged = t[:-2] + ("AA" if t[-2:] != "AA" else "BB")  # another signature
    other_secret = auth.issue_token(claims(), secret="other-secret-of-thirty-two-bytes!!")
    for bad in (forged, other_secret, "garbage"):
        for _ in range(2):
            with pytest.raises(Unauthorized) as invalid:
                verifier.verify(bad, now_s=1000)
            assert invalid.value.code == "token_invalid"
    assert decodes.count(forged) == decodes.count(other_secret) == decodes.count("garbage") == 2


def test_only_the_most_recently_used_tokens_are_remembered(decodes: list[str]) -> None:
    verifier = auth.TokenVerifier(SECRET, max_entries=2)
    a, b, c = (token(name) for name in ("a", "b", "c"))
    for t in (a, b, a, c):  # c pushes out b, the least recently used
        verifier.verify(t, now_s=1000)
    decodes.clear()
    verifier.verify(a, now_s=1000)
    verifier.verify(c, now_s=1000)
    assert decodes == []
    verifier.verify(b, now_s=1000)
    assert decodes == [b]


def test_a_token_must_name_an_account_by_id() -> None:
    """Tokens of the previous format named a user by name (``sub``), which a name registered
    again after its deletion would match: they are refused, as is any token missing a claim
    the revocation rules need."""
    complete = {
        "sub": "7",
        "name": "ann",
        "adm": False,
        "jti": "id-of-ann",
        "iat": 1000,
        "ims": 1_000_000,
        "exp": 1060,
    }
    assert auth.verify_token(pyjwt.encode(complete, SECRET), secret=SECRET, now_s=1000) == claims()
    for changed in (
        {"sub": "ann"},  # the previous format: a name
        {"sub": "-7"},
        {"sub": "7" * 20},
        {"jti": "has spaces"},
        {"adm": "yes"},
        {"ims": "1000000"},
        {"name": 7},
    ):
        payload = {**complete, **changed}
        with pytest.raises(Unauthorized) as invalid:
            auth.verify_token(pyjwt.encode(payload, SECRET), secret=SECRET, now_s=1000)
        assert invalid.value.code == "token_invalid", changed
    for missing in ("sub", "jti", "ims", "name", "exp"):
        payload = {k: v for k, v in complete.items() if k != missing}
        with pytest.raises(Unauthorized):
            auth.verify_token(pyjwt.encode(payload, SECRET), secret=SECRET, now_s=1000)
