"""Accounts and tokens against the real PostgreSQL, Redis and NATS: registration, login, refresh
rotation and reuse, logout, password change, deactivation, the event history of a user, and an
external identity provider's tokens verified against a JWKS served from this process."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from commands.application import open_application
from commands.messages import CreateTicket, UploadedDocument
from identity.accounts import (
    AccountService,
    RegisterUser,
    RegistrationClosed,
    TenantAlreadyExists,
)
from identity.passwords import HashParameters, Passwords
from identity.users import tenant_id_for
from inference.embeddings import FakeEmbedder
from read_api.wiring import query_api
from streams.contract.eventlog import EVENTS_TABLE, RecordedEvent, decode_state
from streams.relay import message_for
from tests.conftest import Servers
from tests.integration.conftest import service_for, settings_for
from tests.support import random_tenant
from tests.unit.test_tokens import hand_signed_hs256
from ticketflow.bootstrap import account_service, commands_api, open_authenticator
from ticketflow.settings import Settings

PASSWORD = "correct horse battery staple"


def cheap_settings(
    servers: Servers, database_url: str | None = None, **overrides: object
) -> Settings:
    """Settings with cheap password hashing (the tests hash many passwords) and no rate limits:
    these tests log in far more often than the per-address login limit allows, and the limits
    have tests of their own (tests/integration/test_limits.py)."""
    return settings_for(
        servers,
        database_url,
        password_hash_time_cost=1,
        password_hash_memory_kib=8 * 1024,
        password_hash_parallelism=1,
        **{"rate_limits_enabled": False, **overrides},
    )


PDF_HEADER = b"%PDF-1.7\n"


@pytest.fixture(scope="module")
def api_settings(servers: Servers) -> Settings:
    return cheap_settings(servers)


@pytest.fixture(scope="module")
def client(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(commands_api(api_settings)) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def register(
    client: TestClient,
    tenant: str,
    email: str,
    *,
    password: str = PASSWORD,
    token: str | None = None,
    roles: list[str] | None = None,
) -> Any:
    body: dict[str, Any] = {"tenant": tenant, "email": email, "password": password}
    if roles is not None:
        body["roles"] = roles
    return client.post("/auth/register", json=body, headers=bearer(token) if token else {})


def login(client: TestClient, tenant: str, email: str, password: str = PASSWORD) -> Any:
    return client.post("/auth/login", json={"tenant": tenant, "email": email, "password": password})


def refresh(client: TestClient, token: str) -> Any:
    return client.post("/auth/refresh", json={"refresh_token": token})


def me(client: TestClient, token: str) -> Any:
    return client.get("/users/me", headers=bearer(token))


@dataclass(frozen=True)
class Session:
    tenant: str
    email: str
    user_id: str
    access: str
    refresh: str


def logged_in(client: TestClient, tenant: str, email: str, password: str = PASSWORD) -> Session:
    response = login(client, tenant, email, password)
    assert response.status_code == 200, response.text
    pair = response.json()
    user_id = me(client, pair["access_token"]).json()["subject"]
    return Session(tenant, email, user_id, pair["access_token"], pair["refresh_token"])


def new_tenant(client: TestClient) -> Session:
    """A new tenant, its first user (the admin) registered and logged in."""
    tenant = random_tenant()
    response = register(client, tenant, "admin@example.org")
    assert response.status_code == 201, response.text
    return logged_in(client, tenant, "admin@example.org")


def member(client: TestClient, admin: Session, email: str, *roles: str) -> Session:
    response = register(client, admin.tenant, email, token=admin.access, roles=list(roles))
    assert response.status_code == 201, response.text
    return logged_in(client, admin.tenant, email)


# -- registration -------------------------------------------------------------------------------


def test_the_first_user_of_a_new_tenant_becomes_its_admin(client: TestClient) -> None:
    tenant = random_tenant()
    response = register(client, tenant, "Ada@Example.org")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["user"]["roles"] == ["admin"]
    assert body["user"]["email"] == "ada@example.org"
    assert body["user"]["tenant"] == tenant
    assert body["position"] > 0
    assert "password" not in json.dumps(body)


def test_a_second_anonymous_registration_in_the_same_tenant_is_refused(
    client: TestClient,
) -> None:
    admin = new_tenant(client)
    response = register(client, admin.tenant, "mallory@example.org")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "tenant_exists"
    assert login(client, admin.tenant, "mallory@example.org").status_code == 401


def test_anonymous_registrants_cannot_pick_their_roles(client: TestClient) -> None:
    response = register(client, random_tenant(), "ada@example.org", roles=["auditor"])
    assert response.status_code == 422


def test_an_admin_registers_users_with_the_roles_they_pick(client: TestClient) -> None:
    admin = new_tenant(client)
    response = register(
        client, admin.tenant, "audrey@example.org", token=admin.access, roles=["auditor"]
    )
    assert response.status_code == 201, response.text
    assert response.json()["user"]["roles"] == ["auditor"]
    plain = register(client, admin.tenant, "bob@example.org", token=admin.access)
    assert plain.json()["user"]["roles"] == ["user"]
    auditor = logged_in(client, admin.tenant, "audrey@example.org")
    assert me(client, auditor.access).json()["roles"] == ["auditor"]


def test_registering_an_address_twice_is_a_conflict(client: TestClient) -> None:
    admin = new_tenant(client)
    member(client, admin, "bob@example.org", "user")
    again = register(client, admin.tenant, " BOB@example.org ", token=admin.access)
    assert again.status_code in (409, 422)
    again = register(client, admin.tenant, "BOB@example.org", token=admin.access)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "user_exists"


def test_only_an_admin_registers_users(client: TestClient) -> None:
    admin = new_tenant(client)
    bob = member(client, admin, "bob@example.org", "user")
    response = register(client, admin.tenant, "carol@example.org", token=bob.access)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"


def test_an_admin_cannot_register_users_in_another_tenant(client: TestClient) -> None:
    admin = new_tenant(client)
    other = new_tenant(client)
    response = register(client, other.tenant, "eve@example.org", token=admin.access)
    assert response.status_code == 404


def test_a_weak_password_is_refused(client: TestClient) -> None:
    response = register(client, random_tenant(), "ada@example.org", password="hunter2")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "weak_password"


def test_an_invalid_token_is_not_taken_for_an_anonymous_registration(client: TestClient) -> None:
    response = register(client, random_tenant(), "ada@example.org", token="not-a-token")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


# -- login and tokens --------------------------------------------------------------------------


def test_login_gives_tokens_that_name_the_account(
    client: TestClient, api_settings: Settings
) -> None:
    admin = new_tenant(client)
    response = login(client, admin.tenant, "ADMIN@example.org")
    assert response.status_code == 200
    pair = response.json()
    assert pair["token_type"] == "Bearer"
    assert pair["expires_in"] == api_settings.access_token_ttl_s == 900
    assert pair["refresh_token"].startswith("tfr_")
    claims = jwt.decode(pair["access_token"], options={"verify_signature": False})
    assert {"iss", "aud", "exp", "iat", "nbf", "jti", "sub", "tenant", "roles", "sid"} <= set(
        claims
    )
    who = me(client, pair["access_token"]).json()
    assert who["tenant"] == admin.tenant
    assert who["roles"] == ["admin"]
    assert who["account"]["email"] == "admin@example.org"
    assert who["account"]["active"] is True


def test_a_wrong_password_and_an_unknown_user_get_the_same_answer(client: TestClient) -> None:
    admin = new_tenant(client)
    wrong = login(client, admin.tenant, "admin@example.org", "not the password at all")
    unknown = login(client, admin.tenant, "nobody@example.org")
    no_tenant = login(client, random_tenant(), "admin@example.org")
    assert wrong.status_code == unknown.status_code == no_tenant.status_code == 401
    assert wrong.json() == unknown.json() == no_tenant.json()
    assert wrong.json()["error"]["code"] == "invalid_credentials"


def test_a_refresh_token_rotates_on_every_use(client: TestClient) -> None:
    session = new_tenant(client)
    first = refresh(client, session.refresh)
    assert first.status_code == 200, first.text
    second = refresh(client, first.json()["refresh_token"])
    assert second.status_code == 200
    tokens = {session.refresh, first.json()["refresh_token"], second.json()["refresh_token"]}
    assert len(tokens) == 3
    assert me(client, second.json()["access_token"]).status_code == 200


def test_reusing_a_spent_refresh_token_revokes_the_whole_family(client: TestClient) -> None:
    session = new_tenant(client)
    newest = refresh(client, session.refresh).json()
    assert me(client, newest["access_token"]).status_code == 200

    reused = refresh(client, session.refresh)
    assert reused.status_code == 401
    assert reused.json()["error"]["code"] == "invalid_refresh_token"
    assert refresh(client, newest["refresh_token"]).status_code == 401
    assert me(client, newest["access_token"]).status_code == 401
    assert me(client, session.access).status_code == 401
    # Another login is another family, untouched.
    assert me(client, logged_in(client, session.tenant, session.email).access).status_code == 200


def test_a_made_up_refresh_token_is_refused(client: TestClient) -> None:
    assert refresh(client, "tfr_" + "x" * 43).status_code == 401
    assert refresh(client, "something else").status_code == 401


def test_logout_revokes_the_access_token_and_its_refresh_tokens(client: TestClient) -> None:
    session = new_tenant(client)
    other_device = logged_in(client, session.tenant, session.email)
    response = client.post("/auth/logout", headers=bearer(session.access))
    assert response.status_code == 204
    assert me(client, session.access).status_code == 401
    assert refresh(client, session.refresh).status_code == 401
    assert me(client, other_device.access).status_code == 200


def test_a_logged_out_token_is_refused_by_the_query_api_too(
    client: TestClient, api_settings: Settings, servers: Servers
) -> None:
    session = new_tenant(client)
    app = query_api(servers.database_url, open_authenticator(api_settings), FakeEmbedder)
    with TestClient(app) as queries:
        assert queries.get("/tickets", headers=bearer(session.access)).status_code == 200
        client.post("/auth/logout", headers=bearer(session.access))
        refused = queries.get("/tickets", headers=bearer(session.access))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_token"


# -- the caller's account and the admins' routes ---------------------------------------------------


def test_changing_the_password_ends_every_session_and_replaces_the_old_one(
    client: TestClient,
) -> None:
    session = new_tenant(client)
    new_password = "a much longer passphrase, 2025"
    wrong = client.post(
        "/users/me/password",
        json={"current_password": "not the password at all", "new_password": new_password},
        headers=bearer(session.access),
    )
    assert wrong.status_code == 403
    assert wrong.json()["error"]["code"] == "wrong_password"
    changed = client.post(
        "/users/me/password",
        json={"current_password": PASSWORD, "new_password": new_password},
        headers=bearer(session.access),
    )
    assert changed.status_code == 204
    assert me(client, session.access).status_code == 401
    assert refresh(client, session.refresh).status_code == 401
    assert login(client, session.tenant, session.email).status_code == 401
    assert login(client, session.tenant, session.email, new_password).status_code == 200


def test_a_deactivated_user_cannot_log_in_refresh_or_use_their_tokens(client: TestClient) -> None:
    admin = new_tenant(client)
    bob = member(client, admin, "bob@example.org", "user")
    response = client.post(f"/users/{bob.user_id}/deactivate", headers=bearer(admin.access))
    assert response.status_code == 200, response.text
    assert response.json()["user"]["active"] is False
    assert me(client, bob.access).status_code == 401
    assert refresh(client, bob.refresh).status_code == 401
    assert login(client, admin.tenant, bob.email).json()["error"]["code"] == "invalid_credentials"


def test_an_admin_cannot_lock_themselves_out(client: TestClient) -> None:
    admin = new_tenant(client)
    own = f"/users/{admin.user_id}"
    assert client.post(f"{own}/deactivate", headers=bearer(admin.access)).status_code == 409
    revoked = client.delete(f"{own}/roles/admin", headers=bearer(admin.access))
    assert revoked.status_code == 409
    assert revoked.json()["error"]["code"] == "own_access"


def test_roles_are_granted_and_revoked_by_an_admin(client: TestClient) -> None:
    admin = new_tenant(client)
    bob = member(client, admin, "bob@example.org", "user")
    granted = client.post(
        f"/users/{bob.user_id}/roles", json={"role": "auditor"}, headers=bearer(admin.access)
    )
    assert granted.status_code == 200
    assert granted.json()["user"]["roles"] == ["auditor", "user"]
    again = client.post(
        f"/users/{bob.user_id}/roles", json={"role": "auditor"}, headers=bearer(admin.access)
    )
    assert again.json()["position"] is None
    revoked = client.delete(f"/users/{bob.user_id}/roles/user", headers=bearer(admin.access))
    assert revoked.json()["user"]["roles"] == ["auditor"]
    # Taking a role away ends the user's sessions, so it applies at once.
    assert me(client, bob.access).status_code == 401
    assert me(client, logged_in(client, bob.tenant, bob.email).access).json()["roles"] == [
        "auditor"
    ]


def test_an_unknown_role_is_refused(client: TestClient) -> None:
    admin = new_tenant(client)
    response = client.post(
        f"/users/{admin.user_id}/roles", json={"role": "root"}, headers=bearer(admin.access)
    )
    assert response.status_code == 422


def test_another_tenants_user_answers_404_to_an_admin(client: TestClient) -> None:
    admin = new_tenant(client)
    stranger = new_tenant(client)
    headers = bearer(admin.access)
    assert client.get(f"/users/{admin.user_id}", headers=headers).status_code == 200
    for response in (
        client.get(f"/users/{stranger.user_id}", headers=headers),
        client.post(f"/users/{stranger.user_id}/deactivate", headers=headers),
        client.post(f"/users/{stranger.user_id}/roles", json={"role": "user"}, headers=headers),
        client.delete(f"/users/{stranger.user_id}/roles/admin", headers=headers),
        client.get(f"/users/{uuid.uuid4()}", headers=headers),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "user_not_found"
    assert me(client, stranger.access).status_code == 200


def test_a_user_without_the_admin_role_cannot_manage_users(client: TestClient) -> None:
    admin = new_tenant(client)
    bob = member(client, admin, "bob@example.org", "user", "auditor")
    response = client.post(f"/users/{admin.user_id}/deactivate", headers=bearer(bob.access))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"


def test_a_users_id_is_not_a_ticket(client: TestClient) -> None:
    admin = new_tenant(client)
    response = client.post(f"/tickets/{admin.user_id}/cancel", headers=bearer(admin.access))
    assert response.status_code == 404


def test_only_users_and_admins_open_tickets(client: TestClient) -> None:
    admin = new_tenant(client)
    auditor = member(client, admin, "audrey@example.org", "auditor")
    files = {"file": ("paper.pdf", PDF_HEADER, "application/pdf")}
    response = client.post("/tickets", files=files, headers=bearer(auditor.access))
    assert response.status_code == 403


# -- the event store ---------------------------------------------------------------------------


def stored_events(servers: Servers, aggregate_id: str) -> list[RecordedEvent]:
    with psycopg.connect(servers.database_url) as conn:
        rows = conn.execute(
            "SELECT notification_id, originator_id, originator_version, topic, state"
            f" FROM {EVENTS_TABLE} WHERE originator_id = %s ORDER BY originator_version",
            (aggregate_id,),
        ).fetchall()
    return [
        RecordedEvent(position, originator, version, topic, decode_state(bytes(state)))
        for position, originator, version, topic, state in rows
    ]


def test_a_users_history_is_in_the_event_store_and_never_shows_the_hash(
    client: TestClient, servers: Servers
) -> None:
    admin = new_tenant(client)
    bob = member(client, admin, "bob@example.org", "user")
    headers = bearer(admin.access)
    client.post(f"/users/{bob.user_id}/roles", json={"role": "auditor"}, headers=headers)
    client.delete(f"/users/{bob.user_id}/roles/auditor", headers=headers)
    client.post(
        "/users/me/password",
        json={"current_password": PASSWORD, "new_password": "another long passphrase"},
        headers=bearer(logged_in(client, bob.tenant, bob.email).access),
    )
    client.post(f"/users/{bob.user_id}/deactivate", headers=headers)

    events = stored_events(servers, bob.user_id)
    assert [event.topic for event in events] == [
        "ticketflow.user.registered.v2",
        "ticketflow.user.role_granted.v1",
        "ticketflow.user.role_revoked.v1",
        "ticketflow.user.password_changed.v1",
        "ticketflow.user.deactivated.v1",
    ]
    assert events[0].state["registered_by"] == admin.user_id
    assert events[0].state["password_hash"].startswith("$argon2id$")
    assert PASSWORD not in json.dumps([event.state for event in events])
    # The address is stored and published encrypted (docs/adr/0021-crypto-shredding.md).
    assert events[0].state["email"]["enc"] == "v1"
    assert bob.email not in json.dumps([event.state for event in events])
    for event in events:
        subject, body, headers_ = message_for(event)
        assert subject == f"tf.evt.{admin.tenant}.user.{bob.user_id}.{event.event_type.name}"
        assert headers_["ce-subject"] == f"user/{bob.user_id}"
        assert b"argon2" not in body
        assert "password_hash" not in event.payload().model_dump()

    [founded] = stored_events(servers, str(tenant_id_for(admin.tenant)))
    assert founded.topic == "ticketflow.tenant.founded.v1"
    assert founded.state["founded_by"] == admin.user_id
    subject, _, _ = message_for(founded)
    assert subject == f"tf.evt.{admin.tenant}.tenant.{tenant_id_for(admin.tenant)}.founded"


# -- the account service on its own ----------------------------------------------------------------


@pytest.fixture
def accounts(api_settings: Settings, servers: Servers) -> Iterator[AccountService]:
    service = account_service(api_settings, servers.database_url)
    yield service
    service.close()


def test_exactly_one_concurrent_registration_founds_a_tenant(accounts: AccountService) -> None:
    tenant = random_tenant()
    barrier = threading.Barrier(4)

    def found(n: int) -> str:
        barrier.wait()
        try:
            accounts.register(RegisterUser(tenant, f"founder{n}@example.org", PASSWORD))
        except TenantAlreadyExists:
            return "refused"
        return "founded"

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(found, range(4)))
    assert sorted(outcomes) == ["founded", "refused", "refused", "refused"]


def test_a_tenant_with_tickets_but_no_accounts_is_opened_by_an_operator_only(
    accounts: AccountService, api_settings: Settings, servers: Servers
) -> None:
    # Tickets opened with tokens of an identity provider (or development tokens): the tenant
    # has history and no account.
    tenant = random_tenant()
    service = service_for(api_settings, servers.database_url)
    try:
        document = UploadedDocument("main", "paper.pdf", "application/pdf", PDF_HEADER + b"1")
        service.create_ticket(CreateTicket(tenant, "idp-user-1", (document,), "tiny"))
    finally:
        service.close()

    with pytest.raises(TenantAlreadyExists, match=r"is in use .*`ticketflow create-admin`"):
        accounts.register(RegisterUser(tenant, "stranger@example.org", PASSWORD))
    assert accounts.register(RegisterUser(random_tenant(), "fresh@example.org", PASSWORD))

    adopted = accounts.register(RegisterUser(tenant, "ops@example.org", PASSWORD), adopt=True)
    assert adopted.account.roles == frozenset({"admin"})
    with pytest.raises(TenantAlreadyExists, match="exists; its admins register"):
        accounts.register(RegisterUser(tenant, "late@example.org", PASSWORD), adopt=True)


def test_a_hash_made_with_older_parameters_is_replaced_at_login(
    accounts: AccountService, servers: Servers
) -> None:
    tenant = random_tenant()
    registered = accounts.register(RegisterUser(tenant, "ada@example.org", PASSWORD))
    stronger = AccountService(
        open_application(servers.database_url, pool_size=1),
        Passwords(parameters=HashParameters(time_cost=2, memory_kib=8 * 1024, parallelism=1)),
    )
    try:
        stronger.login(tenant, "ada@example.org", PASSWORD)
        stronger.login(tenant, "ada@example.org", PASSWORD)
    finally:
        stronger.close()
    events = stored_events(servers, str(registered.account.user_id))
    assert [e.topic for e in events][-1] == "ticketflow.user.password_changed.v1"
    assert len(events) == 2
    assert events[-1].state["reason"] == "rehashed"
    assert "t=2" in events[-1].state["password_hash"]


def test_closed_registration_refuses_to_found_tenants(
    api_settings: Settings, servers: Servers
) -> None:
    closed = account_service(
        api_settings.model_copy(update={"tenant_registration": "closed"}), servers.database_url
    )
    try:
        with pytest.raises(RegistrationClosed):
            closed.register(RegisterUser(random_tenant(), "ada@example.org", PASSWORD))
    finally:
        closed.close()


# -- the tenant-wide history for auditors --------------------------------------------------------


def test_auditors_page_through_their_tenants_history(servers: Servers, fresh_database: str) -> None:
    settings = cheap_settings(servers, fresh_database)
    with (
        TestClient(commands_api(settings)) as commands,
        TestClient(query_api(fresh_database, open_authenticator(settings), FakeEmbedder)) as reads,
    ):
        admin = new_tenant(commands)
        auditor = member(commands, admin, "audrey@example.org", "auditor")
        bob = member(commands, admin, "bob@example.org", "user")
        new_tenant(commands)  # another tenant's events are never shown

        seen: list[dict[str, Any]] = []
        after, pages = 0, 0
        while True:
            response = reads.get(
                "/events", params={"after": after, "limit": 2}, headers=bearer(auditor.access)
            )
            assert response.status_code == 200, response.text
            page = response.json()
            seen.extend(page["events"])
            after, pages = page["next_after"], pages + 1
            if page["caught_up"]:
                break
        assert pages >= 2
        assert [e["type"] for e in seen] == ["founded", "registered", "registered", "registered"]
        assert {e["payload"]["tenant"] for e in seen} == {admin.tenant}
        positions = [e["position"] for e in seen]
        assert positions == sorted(positions)
        assert "argon2" not in json.dumps(seen)
        assert "password" not in json.dumps(seen)

        assert reads.get("/events", headers=bearer(admin.access)).status_code == 200
        forbidden = reads.get("/events", headers=bearer(bob.access))
        assert forbidden.status_code == 403
        # Auditors read tickets and reports (now or as_of), but not a user's live search.
        assert reads.get("/tickets", headers=bearer(auditor.access)).status_code == 200
        searching = reads.post("/search", json={"query": "x"}, headers=bearer(auditor.access))
        assert searching.status_code == 403


# -- an external identity provider ----------------------------------------------------------------

ISSUER = "https://idp.example.org/"
AUDIENCE = "ticketflow-api"


@dataclass
class IdentityProvider:
    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    jwks_url: str

    def token(self, algorithm: str = "RS256", kid: str | None = None, **overrides: object) -> str:
        now = int(time.time())
        claims: dict[str, object] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "idp|42",
            "org": "globex",
            "realm_access": {"roles": ["user", "offline_access"]},
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
        } | overrides
        key = self.rsa_key if algorithm == "RS256" else self.ec_key
        default_kid = "rsa-1" if algorithm == "RS256" else "ec-1"
        return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid or default_kid})


@pytest.fixture(scope="module")
def identity_provider() -> Iterator[IdentityProvider]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks = {
        "keys": [
            RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
            | {"kid": "rsa-1", "alg": "RS256", "use": "sig"},
            ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
            | {"kid": "ec-1", "alg": "ES256", "use": "sig"},
        ]
    }
    body = json.dumps(jwks).encode()

    class Jwks(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        yield IdentityProvider(rsa_key, ec_key, f"http://127.0.0.1:{port}/jwks.json")
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def idp_client(servers: Servers, identity_provider: IdentityProvider) -> Iterator[TestClient]:
    settings = cheap_settings(
        servers,
        jwks_url=identity_provider.jwks_url,
        jwks_issuer=ISSUER,
        jwks_audience=AUDIENCE,
        jwks_tenant_claim="org",
        jwks_roles_claim="realm_access.roles",
    )
    with TestClient(commands_api(settings)) as client:
        yield client


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_the_identity_providers_tokens_are_accepted(
    idp_client: TestClient, identity_provider: IdentityProvider, algorithm: str
) -> None:
    response = me(idp_client, identity_provider.token(algorithm))
    assert response.status_code == 200, response.text
    assert response.json() == {
        "subject": "idp|42",
        "tenant": "globex",
        "roles": ["user"],
        "issuer": ISSUER,
        "account": None,
    }


def test_our_own_tokens_are_still_accepted_beside_the_providers(idp_client: TestClient) -> None:
    session = new_tenant(idp_client)
    assert me(idp_client, session.access).json()["account"]["email"] == "admin@example.org"


def test_a_logged_out_provider_token_is_refused(
    idp_client: TestClient, identity_provider: IdentityProvider
) -> None:
    token = identity_provider.token()
    assert idp_client.post("/auth/logout", headers=bearer(token)).status_code == 204
    assert me(idp_client, token).status_code == 401


def test_provider_tokens_that_must_not_pass_are_refused(
    idp_client: TestClient, identity_provider: IdentityProvider
) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = identity_provider.rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "org": "globex", "iat": now}
    refused = {
        "another key": jwt.encode(
            claims | {"exp": now + 60}, stranger, algorithm="RS256", headers={"kid": "rsa-1"}
        ),
        "an unknown key id": identity_provider.token(kid="rsa-9"),
        "alg none": jwt.encode(claims | {"exp": now + 60}, "", algorithm="none"),
        "the wrong audience": identity_provider.token(aud="someone-else"),
        "the wrong issuer": identity_provider.token(iss="https://evil.example.org/"),
        "an expired token": identity_provider.token(exp=now - 60),
        "no tenant": identity_provider.token(org=None),
        "HS256 with the public key": hand_signed_hs256(claims | {"exp": now + 60}, public_pem),
        "RS256 naming the EC key": jwt.encode(
            claims | {"exp": now + 60},
            identity_provider.rsa_key,
            algorithm="RS256",
            headers={"kid": "ec-1"},
        ),
    }
    for reason, token in refused.items():
        response = me(idp_client, token)
        assert response.status_code == 401, reason
        assert response.json()["error"]["code"] == "invalid_token", reason


def test_an_operator_opens_a_tenant_from_the_command_line(
    client: TestClient, servers: Servers
) -> None:
    from typer.testing import CliRunner

    from ticketflow.cli import app

    tenant = random_tenant()
    env = {
        "TF_DATABASE_URL": servers.database_url,
        "TF_NATS_URL": servers.nats_url,
        "TF_NATS_CREDENTIALS": str(servers.nats_credentials),
        "TF_REDIS_URL": servers.redis_url,
        "TF_TENANT_REGISTRATION": "closed",
        "TF_PASSWORD_HASH_MEMORY_KIB": "8192",
        "TF_PASSWORD_HASH_TIME_COST": "1",
        "TF_PASSWORD_HASH_PARALLELISM": "1",
    }
    args = ["create-admin", "--tenant", tenant, "--email", "ops@example.org"]
    result = CliRunner().invoke(app, [*args, "--password", PASSWORD], env=env)
    assert result.exit_code == 0, result.output
    assert me(client, logged_in(client, tenant, "ops@example.org").access).json()["roles"] == [
        "admin"
    ]
    again = CliRunner().invoke(app, [*args, "--password", PASSWORD], env=env)
    assert again.exit_code == 1
