"""POST /integrations/nats-credentials: who may ask, for which tenant, and what comes back."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI, Header, HTTPException
from fastapi.testclient import TestClient

from identity.integrations import CredentialsUnavailable, Mint, integrations_router
from streams.contract.identity import Principal
from ticketflow.nats_auth import (
    IntegratorSigner,
    decode_jwt,
    new_seed,
    parse_credentials,
    public_key,
)

ROUTE = "/integrations/nats-credentials"


def caller_from_header(x_test_caller: str | None = Header(default=None)) -> Principal:
    """A stand-in for the API's Bearer authentication: `tenant:role,role`."""
    if x_test_caller is None:
        raise HTTPException(401, "unauthenticated")
    tenant, roles = x_test_caller.split(":")
    return Principal(subject="dana", tenant=tenant, roles=frozenset(roles.split(",")))


def client_with(mint: Mint) -> TestClient:
    app = FastAPI()
    app.include_router(integrations_router(principal=caller_from_header, mint=mint))
    return TestClient(app)


@pytest.fixture
def signer() -> IntegratorSigner:
    seed = new_seed("account")
    return IntegratorSigner(seed, public_key(seed))


@pytest.fixture
def real_mint(signer: IntegratorSigner) -> Callable[[Principal], str]:
    def mint(principal: Principal) -> str:
        return signer.credentials(principal.tenant, principal.subject, timedelta(days=1))

    return mint


@pytest.mark.parametrize("roles", ["integrator", "admin", "user,integrator"])
def test_an_integrator_or_admin_gets_credentials_for_their_own_tenant(
    real_mint: Callable[[Principal], str], roles: str
) -> None:
    response = client_with(real_mint).post(ROUTE, headers={"X-Test-Caller": f"acme:{roles}"})

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["tenant"] == "acme"
    assert body["subject"] == "tf.evt.acme.>"
    claims = decode_jwt(parse_credentials(body["credentials"])[0])
    assert claims["nats"]["sub"] == {"allow": ["tf.evt.acme.>"]}
    assert claims["name"] == "acme/dana"
    expires = datetime.fromisoformat(body["expires_at"])
    assert expires == datetime.fromtimestamp(claims["exp"], UTC)
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("roles", ["user", "auditor"])
def test_other_roles_are_forbidden(real_mint: Callable[[Principal], str], roles: str) -> None:
    calls: list[Principal] = []

    def counting(principal: Principal) -> str:
        calls.append(principal)
        return real_mint(principal)

    response = client_with(counting).post(ROUTE, headers={"X-Test-Caller": f"acme:{roles}"})

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert calls == []


def test_an_unauthenticated_caller_is_refused_by_the_principal_dependency(
    real_mint: Callable[[Principal], str],
) -> None:
    assert client_with(real_mint).post(ROUTE).status_code == 401


def test_an_asynchronous_mint_is_awaited(real_mint: Callable[[Principal], str]) -> None:
    async def mint(principal: Principal) -> str:
        return real_mint(principal)

    response = client_with(mint).post(ROUTE, headers={"X-Test-Caller": "acme:integrator"})

    assert response.status_code == 201
    assert response.json()["credentials"].startswith("-----BEGIN NATS USER JWT-----")


def test_a_deployment_without_a_signing_key_answers_503() -> None:
    def unavailable(_: Principal) -> str:
        raise CredentialsUnavailable("no key")

    response = client_with(unavailable).post(ROUTE, headers={"X-Test-Caller": "acme:integrator"})

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "nats_credentials_unavailable"
    assert "no key" not in response.text


def test_the_route_is_documented_in_openapi(real_mint: Callable[[Principal], str]) -> None:
    schema: dict[str, Any] = client_with(real_mint).get("/openapi.json").json()
    operation = schema["paths"][ROUTE]["post"]

    assert set(operation["responses"]) >= {"201", "401", "403", "503"}
