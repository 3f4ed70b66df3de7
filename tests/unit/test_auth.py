"""Access tokens: what verifies and what is refused."""

from __future__ import annotations

import time

import jwt
import pytest

from streams.contract.identity import AuthenticationError
from ticketflow.auth import JwtCodec
from ticketflow.settings import DEVELOPMENT_JWT_SECRET, Settings

SECRET = "s" * 40
codec = JwtCodec(SECRET, issuer="ticketflow", audience="ticketflow")


def claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {
        "sub": "alice",
        "tenant": "acme",
        "roles": ["user"],
        "iss": "ticketflow",
        "aud": "ticketflow",
        "iat": now,
        "exp": now + 60,
    }
    base.update(overrides)
    return base


def test_a_minted_token_verifies_to_its_principal() -> None:
    principal = codec.verify(codec.mint(subject="alice", tenant="acme", roles=["user", "admin"]))
    assert (principal.subject, principal.tenant) == ("alice", "acme")
    assert principal.roles == {"user", "admin"}


def test_an_expired_token_is_refused() -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 10), SECRET, algorithm="HS256")
    with pytest.raises(AuthenticationError, match="expired"):
        codec.verify(token)


def test_a_token_signed_with_another_key_is_refused() -> None:
    token = jwt.encode(claims(), "another-key-of-sufficient-length!!", algorithm="HS256")
    with pytest.raises(AuthenticationError):
        codec.verify(token)


def test_an_unsigned_token_is_refused() -> None:
    token = jwt.encode(claims(), "", algorithm="none")
    with pytest.raises(AuthenticationError):
        codec.verify(token)


def test_a_token_for_another_audience_is_refused() -> None:
    token = jwt.encode(claims(aud="someone-else"), SECRET, algorithm="HS256")
    with pytest.raises(AuthenticationError, match=r"(?i)audience"):
        codec.verify(token)


def test_a_token_without_a_valid_tenant_is_refused() -> None:
    token = jwt.encode(claims(tenant="Not A Slug"), SECRET, algorithm="HS256")
    with pytest.raises(AuthenticationError, match="tenant"):
        codec.verify(token)


def test_unknown_roles_are_dropped() -> None:
    token = jwt.encode(claims(roles=["user", "superuser"]), SECRET, algorithm="HS256")
    assert codec.verify(token).roles == {"user"}


def test_production_refuses_the_development_secret() -> None:
    with pytest.raises(ValueError, match="TF_JWT_SECRET"):
        Settings(env="production", jwt_secret=DEVELOPMENT_JWT_SECRET)


def test_settings_come_from_tf_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TF_DATABASE_URL", "postgresql://db/x")
    monkeypatch.setenv("TF_MAX_PAGES", "12")
    settings = Settings()
    assert settings.database_url == "postgresql://db/x"
    assert settings.max_pages == 12
