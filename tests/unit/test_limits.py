"""Rate limit rules: how rates are written, which apply to a route, and whose counter they use."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from security.limits import Rate, RateLimitRules
from ticketflow.settings import Settings


@pytest.mark.parametrize(
    ("text", "limit", "period_s"),
    [
        ("60/hour", 60, 3600),
        ("600/minute", 600, 60),
        ("600/min", 600, 60),
        ("3/2s", 3, 2),
        ("3 / 2 seconds", 3, 2),
        ("1000/day", 1000, 86400),
        ("5/1.5h", 5, 5400),
    ],
)
def test_a_rate_reads_as_a_count_per_period(text: str, limit: int, period_s: float) -> None:
    assert Rate.parse(text) == Rate(limit, period_s)


@pytest.mark.parametrize("text", ["", "60", "60/", "/hour", "0/hour", "60/fortnight", "5/ms"])
def test_a_rate_that_does_not_read_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        Rate.parse(text)


def test_creating_tickets_is_limited_per_user_and_tenant_by_default() -> None:
    rates = RateLimitRules.with_defaults().rates_for("POST /tickets")
    assert rates["user"] == ("POST /tickets", Rate(60, 3600))
    assert rates["tenant"] == ("POST /tickets", Rate(600, 3600))


def test_a_route_without_a_rule_uses_the_default_rule_and_its_counters() -> None:
    rates = RateLimitRules.with_defaults().rates_for("GET /tickets/{}")
    assert rates["user"] == ("*", Rate(600, 60))
    assert rates["tenant"] == ("*", Rate(6000, 60))
    assert rates["anonymous"] == ("*", Rate(600, 60))
    assert "ip" not in rates


def test_overrides_are_laid_over_the_defaults_rate_by_rate() -> None:
    rules = RateLimitRules.with_defaults({"post /tickets": {"user": "10/hour"}})
    rates = rules.rates_for("POST /tickets")
    assert rates["user"] == ("POST /tickets", Rate(10, 3600))
    assert rates["tenant"] == ("POST /tickets", Rate(600, 3600))


def test_null_turns_a_rate_off() -> None:
    rates = RateLimitRules.with_defaults({"POST /tickets": {"tenant": None}}).rates_for(
        "POST /tickets"
    )
    assert "tenant" not in rates


def test_parameter_names_in_a_rule_do_not_matter() -> None:
    rules = RateLimitRules.with_defaults({"POST /tickets/{id}/cancel": {"user": "1/hour"}})
    assert rules.rates_for("POST /tickets/{}/cancel")["user"][1] == Rate(1, 3600)


def test_a_caller_is_counted_per_user_and_per_tenant() -> None:
    counters = RateLimitRules.with_defaults().counters(
        "POST /tickets", ("alice", "acme"), "10.0.0.1"
    )
    assert sorted(counter.key for counter in counters) == [
        "POST /tickets:tenant:acme",
        "POST /tickets:user:acme:alice",
    ]


def test_a_request_without_a_valid_token_is_counted_per_client_ip() -> None:
    counters = RateLimitRules.with_defaults().counters("POST /tickets", None, "10.0.0.1")
    assert [counter.key for counter in counters] == ["*:anonymous:10.0.0.1"]


def test_login_is_counted_per_client_ip_even_with_a_token() -> None:
    counters = RateLimitRules.with_defaults().counters(
        "POST /auth/login", ("mallory", "acme"), "10.0.0.1"
    )
    keys = {counter.key for counter in counters}
    assert "POST /auth/login:ip:10.0.0.1" in keys
    assert next(c for c in counters if c.kind == "ip").rate == Rate(30, 60)


@pytest.mark.parametrize(
    "rules",
    [
        {"POST /tickets": {"users": "1/hour"}},
        {"/tickets": {"user": "1/hour"}},
        {"POST /tickets": {"user": "lots"}},
    ],
)
def test_a_rule_that_does_not_read_is_refused(rules: dict[str, dict[str, str | None]]) -> None:
    with pytest.raises(ValueError, match=r"rule|rate"):
        RateLimitRules.with_defaults(rules)


def test_settings_read_rate_limits_from_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TF_RATE_LIMITS", '{"POST /tickets": {"user": "5/hour"}}')
    settings = Settings()
    rules = RateLimitRules.with_defaults(settings.rate_limits)
    assert rules.rates_for("POST /tickets")["user"][1] == Rate(5, 3600)


def test_settings_with_an_unreadable_rate_limit_fail_at_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TF_RATE_LIMITS", '{"POST /tickets": {"user": "often"}}')
    with pytest.raises(ValidationError, match="often"):
        Settings()


def test_the_command_api_cap_fits_every_document_and_the_form() -> None:
    settings = Settings(max_upload_bytes=1024 * 1024, max_documents_per_ticket=4)
    assert settings.command_request_cap > 4 * 1024 * 1024
    assert Settings(max_command_request_bytes=2048).command_request_cap == 2048
