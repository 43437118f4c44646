"""The gate for implementations that need a real service: skip locally, fail under CI."""

from __future__ import annotations

import pytest

from .harness import Impl, impl_params, require_service, services_required

URL_VAR = "CHATNODE_TEST_MYSQL_URL"


def test_the_url_is_returned_when_set() -> None:
    assert require_service(URL_VAR, {URL_VAR: " mysql://db/test "}) == "mysql://db/test"


def test_a_missing_service_skips_locally() -> None:
    with pytest.raises(pytest.skip.Exception, match=URL_VAR):
        require_service(URL_VAR, {URL_VAR: ""})


@pytest.mark.parametrize("env", [{"CI": "true"}, {"CI": "1"}, {"CHATNODE_REQUIRE_SERVICES": "1"}])
def test_a_missing_service_fails_when_services_are_required(env: dict[str, str]) -> None:
    with pytest.raises(pytest.fail.Exception, match=URL_VAR):
        require_service(URL_VAR, env)


@pytest.mark.parametrize("value", ["", "0", "false", "False", "no", "off"])
def test_false_values_do_not_require_services(value: str) -> None:
    assert not services_required({"CI": value, "CHATNODE_REQUIRE_SERVICES": value})


def test_service_backed_params_are_marked_integration() -> None:
    def unused(url: str) -> object:
        raise AssertionError

    params = impl_params({"embedded": Impl(unused), "mysql": Impl(unused, service_env=URL_VAR)})

    marks = {param.id: [mark.name for mark in param.marks] for param in params}
    assert marks == {"embedded": [], "mysql": ["integration"]}
