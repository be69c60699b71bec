"""The proxy TOML's [governance] section: parsed by governance.parse_policy_set, errors named by key."""

from __future__ import annotations

import tomllib

import pytest

from octoproxy.governance import PolicySet
from octoproxy.proxy._config import parse_config
from octoproxy.protocol._errors import ConfigError

BASE = """
[outbound]
uds = "/tmp/x.sock"
"""


def test_governance_section_parses_to_a_policy_set_and_dumps_back() -> None:
    cfg = parse_config(tomllib.loads(BASE + '[governance]\nversion = "7"\n[governance.services.echo.breaker]\nmax_requests = 3\n'))
    assert isinstance(cfg.governance, PolicySet) and cfg.governance.version == "7"
    policy = cfg.governance.for_service("echo")
    assert policy is not None and policy.breaker is not None and policy.breaker.max_requests == 3
    again = parse_config(cfg.to_dict())
    assert again.governance == cfg.governance


def test_absent_governance_is_none() -> None:
    assert parse_config(tomllib.loads(BASE)).governance is None


def test_every_bad_governance_key_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(BASE + "[governance.services.echo.retry]\nmax_attempts = 0\nbogus = 1\n"))
    msg = str(info.value)
    assert "governance.services.echo.retry.max_attempts" in msg and "governance.services.echo.retry.bogus: unknown key" in msg
