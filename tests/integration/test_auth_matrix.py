"""Who may call what, route by route: every route of both APIs against every kind of caller.

The table below is docs/security.md written as data: for each route (method and path template)
the roles it needs, what a caller who may pass gets, and what a valid token of another tenant
gets. Each route is called over real HTTP (both APIs as `ticketflow.bootstrap` builds them,
served by uvicorn on a database of their own) with: no token; an expired token; one signed with
another key; one with `alg: none`; one for another audience; one from another issuer; a valid
token of another tenant (holding every role, so only the tenant stands in the way); and a valid
token of the first tenant for each role. Path parameters name real things of the first tenant:
a completed ticket (so its progress stream ends, and is read boundedly all the same), users, and
fresh tickets and users where a call changes them. The anonymous routes (health, login, refresh,
the documentation) must do their job whatever token comes along; registering without a token
founds a new tenant. Test ids read `api: METHOD /path | caller -> status`.

A route that is mounted but not in the table, or a row for a route that is not mounted, fails
`test_the_table_covers_every_route`.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncpg
import httpx
import jwt
import pytest
from fastapi import FastAPI

from commands.messages import (
    CompleteSubtask,
    CreateTicket,
    FailSubtask,
    RecordIngestion,
    UploadedDocument,
)
from commands.service import CommandService
from inference.embeddings import FakeEmbedder
from inference.retrieval import ChunkRecord, ChunkStore, DocumentStats
from projections import Projector
from streams import contract
from streams.contract.audit import PublicKey
from streams.contract.audit_bundle import verify_bundle
from tests.conftest import Servers
from tests.integration.conftest import service_for
from tests.integration.served_apis import ServedApis, served_apis
from tests.support import random_tenant, sample
from ticketflow.bootstrap import jwt_codec

Api = Literal["commands", "queries"]

ROLES = ("user", "admin", "auditor", "integrator")
PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a different and longer passphrase"
PDF = sample("research-paper.pdf").read_bytes()
CHUNK_TEXT = "quarterly revenue grew by ten percent"
DOCS_ROUTES = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


# -- callers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """One column of the table: who calls, and what is wrong with their token, if anything."""

    name: str
    defect: str | None = None
    other_tenant: bool = False
    role: str | None = None


CALLERS = [
    Caller("no token", defect="missing"),
    Caller("expired", defect="expired"),
    Caller("another key", defect="another key"),
    Caller("alg none", defect="alg none"),
    Caller("wrong audience", defect="wrong audience"),
    Caller("wrong issuer", defect="wrong issuer"),
    Caller("other tenant", other_tenant=True),
    *(Caller(role, role=role) for role in ROLES),
]


# -- the world the calls refer to ----------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    name: str
    founder_id: str


@dataclass
class World:
    apis: ServedApis
    commands: httpx.Client
    queries: httpx.Client
    service: CommandService
    a: Tenant
    """The tenant whose things the paths name."""
    b: Tenant
    """Another tenant."""
    member_id: str = ""
    member_email: str = ""
    ticket_id: str = ""
    """A completed ticket of tenant a, in the read models."""
    flashcards_ticket_id: str = ""
    """A completed flashcards ticket of tenant a, in the read models."""
    chunk_sha256: str = field(default_factory=lambda: secrets.token_hex(32))

    def client(self, api: Api) -> httpx.Client:
        return self.commands if api == "commands" else self.queries

    def tenant_of(self, caller: Caller) -> Tenant:
        return self.b if caller.other_tenant else self.a

    def token(self, tenant: Tenant, roles: tuple[str, ...], subject: str | None = None) -> str:
        return jwt_codec(self.apis.settings).mint(
            subject=subject or tenant.founder_id, tenant=tenant.name, roles=roles
        )

    def bad_token(self, defect: str, tenant: Tenant, subject: str | None = None) -> str:
        """A token of `tenant` with every role that is refused for `defect` alone."""
        settings = self.apis.settings
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": settings.jwt_issuer,
            "aud": settings.jwt_audience,
            "sub": subject or tenant.founder_id,
            "tenant": tenant.name,
            "roles": list(ROLES),
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
        }
        secret = settings.jwt_secret
        if defect == "expired":
            claims |= {"iat": now - 3600, "nbf": now - 3600, "exp": now - 60}
        elif defect == "another key":
            secret = "another-secret-that-is-long-enough-for-hs256"
        elif defect == "alg none":
            return jwt.encode(claims, "", algorithm="none")
        elif defect == "wrong audience":
            claims["aud"] = "someone-else"
        elif defect == "wrong issuer":
            claims["iss"] = "someone-else"
        else:
            raise ValueError(defect)
        return jwt.encode(claims, secret, algorithm="HS256")

    def admin_headers(self, tenant: Tenant) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(tenant, ('admin',))}"}

    def new_member(self, tenant: Tenant, *roles: str, email: str | None = None) -> str:
        """A user of `tenant` registered by its admin; returns the user's id."""
        body = {
            "tenant": tenant.name,
            "email": email or f"u{secrets.token_hex(4)}@example.org",
            "password": PASSWORD,
            "roles": list(roles or ("user",)),
        }
        response = self.commands.post(
            "/auth/register", json=body, headers=self.admin_headers(tenant)
        )
        assert response.status_code == 201, response.text
        return str(response.json()["user"]["user_id"])

    def new_ticket(self, pipeline: str = "tiny") -> str:
        """A running ticket of tenant a, straight from the command service."""
        document = UploadedDocument("main", "paper.pdf", "application/pdf", PDF)
        created = self.service.create_ticket(
            CreateTicket(self.a.name, self.a.founder_id, (document,), pipeline)
        )
        return str(created.ticket_id)

    def completed_ticket(self) -> str:
        ticket_id = uuid.UUID(self.new_ticket())
        ingested = contract.IngestedDocument(
            role="main", sha256="0" * 64, pages=3, characters=1200, chunks=4
        )
        self.service.record_ingestion(RecordIngestion(ticket_id, (ingested,)))
        usage = contract.TokenUsage(prompt_tokens=100, completion_tokens=20, cached_tokens=40)
        for subtask in ("a", "b", "c", "d"):
            self.service.complete_subtask(
                CompleteSubtask(ticket_id, subtask, 1, {"x": subtask}, "smollm2", usage, 12.5)
            )
        return str(ticket_id)

    def completed_flashcards_ticket(self) -> str:
        ticket_id = uuid.UUID(self.new_ticket("flashcards"))
        ingested = contract.IngestedDocument(
            role="main", sha256="0" * 64, pages=3, characters=1200, chunks=4
        )
        self.service.record_ingestion(RecordIngestion(ticket_id, (ingested,)))
        usage = contract.TokenUsage(prompt_tokens=100, completion_tokens=20, cached_tokens=40)
        card = {"front": "Q?", "back": "A.", "cloze": None, "difficulty": "easy"}
        output = {"language": "en", "cards": [card | {"duplicate": False, "duplicate_of": None}]}
        self.service.complete_subtask(
            CompleteSubtask(ticket_id, "cards", 1, output, "smollm2", usage, 12.5)
        )
        return str(ticket_id)

    def failed_ticket(self) -> str:
        """A ticket of tenant a whose subtask `a` failed for good (so it may be retried)."""
        ticket_id = uuid.UUID(self.new_ticket())
        ingested = contract.IngestedDocument(
            role="main", sha256="0" * 64, pages=3, characters=1200, chunks=4
        )
        self.service.record_ingestion(RecordIngestion(ticket_id, (ingested,)))
        self.service.fail_subtask(FailSubtask(ticket_id, "a", 1, "no valid output", False))
        return str(ticket_id)

    def refresh_token(self) -> str:
        response = self.commands.post(
            "/auth/login",
            json={"tenant": self.a.name, "email": self.member_email, "password": PASSWORD},
        )
        assert response.status_code == 200, response.text
        return str(response.json()["refresh_token"])


def run_async(make: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Runs a coroutine to completion on a loop of its own, in a thread of its own."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(make())
        except BaseException as error:  # handed to the caller
            errors.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(120)
    if errors:
        raise errors[0]


async def prepare_read_side(world: World) -> None:
    """Projects what is in the event store, and gives tenant a a searchable chunk."""
    pool = await asyncpg.create_pool(world.apis.database_url, min_size=1, max_size=2)
    try:
        await Projector(pool).catch_up()
        # Any unit vector will do: the nearest-neighbour half of the search returns the tenant's
        # chunks whatever the query embeds to, and the full-text half matches the words.
        vector = FakeEmbedder().vector(CHUNK_TEXT)
        await ChunkStore(pool).store(
            world.a.name,
            world.chunk_sha256,
            [ChunkRecord(0, CHUNK_TEXT, 1, None, vector)],
            DocumentStats(chunks=1, characters=len(CHUNK_TEXT), pages=1),
        )
    finally:
        await pool.close()


def found_tenant(client: httpx.Client) -> Tenant:
    name = random_tenant()
    body = {"tenant": name, "email": "founder@example.org", "password": PASSWORD}
    response = client.post("/auth/register", json=body)
    assert response.status_code == 201, response.text
    return Tenant(name, str(response.json()["user"]["user_id"]))


@pytest.fixture(scope="module")
def world(servers: Servers) -> Iterator[World]:
    with (
        served_apis(servers) as apis,
        httpx.Client(base_url=apis.commands_url, timeout=30) as commands,
        httpx.Client(base_url=apis.queries_url, timeout=30) as queries,
    ):
        service = service_for(apis.settings, apis.database_url)
        try:
            world = World(
                apis, commands, queries, service, found_tenant(commands), found_tenant(commands)
            )
            world.member_email = "member@example.org"
            world.member_id = world.new_member(world.a, "user", email=world.member_email)
            world.ticket_id = world.completed_ticket()
            world.flashcards_ticket_id = world.completed_flashcards_ticket()
            run_async(lambda: prepare_read_side(world))
            yield world
        finally:
            service.close()


# -- what each route is called with --------------------------------------------------------------


Check = Callable[[World, Tenant, httpx.Response], None]


@dataclass
class Call:
    """One request, ready to send: path parameters, body, and what to check when it passes."""

    path_params: dict[str, str] = field(default_factory=dict)
    json: Any = None
    files: Any = None
    subject: str | None = None
    """Whose token: by default the founder of the caller's tenant."""
    check: Check | None = None


Build = Callable[[World, Caller], Call]


def plain(world: World, caller: Caller) -> Call:
    return Call()


def on_ticket(world: World, caller: Caller) -> Call:
    return Call({"ticket_id": world.ticket_id})


def register(world: World, caller: Caller) -> Call:
    # Without a token: the first user of a new tenant. With one: a user of tenant a.
    tenant = random_tenant() if caller.defect == "missing" else world.a.name
    email = f"r{secrets.token_hex(4)}@example.org"
    body: dict[str, Any] = {"tenant": tenant, "email": email, "password": PASSWORD}

    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert response.json()["user"]["tenant"] == tenant
        assert response.json()["user"]["email"] == email

    return Call(json=body, check=check)


def login(world: World, caller: Caller) -> Call:
    body = {"tenant": world.a.name, "email": world.member_email, "password": PASSWORD}

    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert response.json()["token_type"] == "Bearer"
        claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
        assert claims["sub"] == world.member_id

    return Call(json=body, check=check)


def refresh(world: World, caller: Caller) -> Call:
    return Call(json={"refresh_token": world.refresh_token()})


def who_am_i(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert response.json()["tenant"] == caller_tenant.name
        assert response.json()["subject"] == caller_tenant.founder_id

    return Call(check=check)


def change_password(world: World, caller: Caller) -> Call:
    # The caller's own account, in the caller's tenant, made for this call.
    subject = world.new_member(world.tenant_of(caller), "user")
    body = {"current_password": PASSWORD, "new_password": NEW_PASSWORD}
    return Call(json=body, subject=subject)


def check_user(user_id: str, **expected: Any) -> Check:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        body = response.json()
        user = body.get("user", body)
        assert user["user_id"] == user_id
        assert user["tenant"] == world.a.name
        for key, value in expected.items():
            assert user[key] == value, key

    return check


def on_member(world: World, caller: Caller) -> Call:
    return Call({"user_id": world.member_id}, check=check_user(world.member_id))


def grant_role(world: World, caller: Caller) -> Call:
    user_id = world.new_member(world.a, "user")
    check = check_user(user_id, roles=["auditor", "user"])
    return Call({"user_id": user_id}, json={"role": "auditor"}, check=check)


def revoke_role(world: World, caller: Caller) -> Call:
    user_id = world.new_member(world.a, "user", "auditor")
    return Call({"user_id": user_id, "role": "auditor"}, check=check_user(user_id, roles=["user"]))


def deactivate(world: World, caller: Caller) -> Call:
    user_id = world.new_member(world.a, "user")
    return Call({"user_id": user_id}, check=check_user(user_id, active=False))


def erase_user(world: World, caller: Caller) -> Call:
    user_id = world.new_member(world.a, "user")
    return Call({"user_id": user_id}, check=check_user(user_id, active=False, email="[erased]"))


def set_retention(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert response.json()["tenant"] == caller_tenant.name
        assert response.json()["days"] == 3650

    return Call(json={"days": 3650}, check=check)


def open_ticket(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert response.json()["created"] is True

    return Call(files={"file": ("paper.pdf", PDF, "application/pdf")}, check=check)


def cancel_ticket(world: World, caller: Caller) -> Call:
    ticket_id = world.new_ticket()

    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert response.json()["ticket_id"] == ticket_id

    return Call({"ticket_id": ticket_id}, check=check)


def ask_question(world: World, caller: Caller) -> Call:
    ticket_id = world.completed_ticket()

    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert response.json()["ticket_id"] == ticket_id
        assert response.json()["created"] is True

    return Call({"ticket_id": ticket_id}, json={"question": "What is the goal?"}, check=check)


def nats_creds(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert response.json()["tenant"] == caller_tenant.name
        assert response.json()["subject"] == f"tf.evt.{caller_tenant.name}.>"

    return Call(check=check)


def list_tickets(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        listed = {item["ticket_id"] for item in response.json()["items"]}
        if caller_tenant == world.a:
            assert world.ticket_id in listed
        else:
            assert world.ticket_id not in listed

    return Call(check=check)


def ticket_detail(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert response.json()["ticket_id"] == world.ticket_id

    return Call({"ticket_id": world.ticket_id}, check=check)


def flashcards_package(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert response.headers["content-type"] == "application/apkg"
        assert response.content.startswith(b"PK")

    return Call({"ticket_id": world.flashcards_ticket_id}, check=check)


def explain(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        body = response.json()
        assert body["ticket_id"] == world.ticket_id
        assert {field["subtask_id"] for field in body["fields"]} == {"a", "b", "c", "d"}

    return Call({"ticket_id": world.ticket_id}, check=check)


def report_diff(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        body = response.json()
        assert body["a"]["ticket_id"] == body["b"]["ticket_id"] == world.ticket_id
        assert body["equal"] is True

    return Call({"ticket_id": world.ticket_id, "other_id": world.ticket_id}, check=check)


def ticket_history(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        events = response.json()["events"]
        assert events[0]["type"] == "created"
        assert {event["payload"]["tenant"] for event in events} == {world.a.name}

    return Call({"ticket_id": world.ticket_id}, check=check)


def tenant_history(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        events = response.json()["events"]
        tenants = {event["payload"].get("tenant") for event in events}
        assert tenants == {caller_tenant.name}
        if caller_tenant == world.a:
            assert world.ticket_id in {event["aggregate_id"] for event in events}

    return Call(check=check)


def stream(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "event: created" in response.text
        assert "event: completed" in response.text

    return Call({"ticket_id": world.ticket_id}, check=check)


def search(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        found = {hit["document_sha256"] for hit in response.json()["results"]}
        if caller_tenant == world.a:
            assert world.chunk_sha256 in found
        else:
            assert world.chunk_sha256 not in found

    return Call(json={"query": "quarterly revenue", "top_k": 5}, check=check)


def audit_keys(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        keys = response.json()["keys"]
        assert all(key["algorithm"] == "Ed25519" for key in keys)
        assert all(PublicKey.from_json(key).key_id == key["key_id"] for key in keys)

    return Call(check=check)


def audit_export(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert response.headers["content-type"] == "application/gzip"
        with tempfile.TemporaryDirectory() as scratch:
            bundle = Path(scratch) / "bundle.tar.gz"
            bundle.write_bytes(response.content)
            report = verify_bundle(bundle)
        assert report.ok, report.problems
        assert report.tenant == caller_tenant.name
        assert report.events > 0  # the tenant's founding, at least

    return Call(check=check)


def asyncapi(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        document = response.json()
        assert document["asyncapi"].startswith("3.")
        assert "ticketflow.ticket.created.v1" in document["components"]["messages"]

    return Call(check=check)


def retry_subtask(world: World, caller: Caller) -> Call:
    ticket_id = world.failed_ticket()

    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        if response.headers["content-type"].startswith("application/json"):
            assert response.json()["ticket_id"] == ticket_id
        else:
            assert "Retried" in response.text

    return Call({"ticket_id": ticket_id, "subtask_id": "a"}, check=check)


def console_login(world: World, caller: Caller) -> Call:
    fields = {"tenant": world.a.name, "email": world.member_email, "password": PASSWORD}

    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert response.json()["token_type"] == "Bearer"

    return Call(files={key: (None, value) for key, value in fields.items()}, check=check)


def console_static(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert response.headers["content-type"].startswith("text/javascript")
        assert "htmx" in response.text

    return Call({"name": "htmx.min.js"}, check=check)


def console_tickets(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert (world.ticket_id in response.text) == (caller_tenant == world.a)

    return Call(check=check)


def console_ticket(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert "completed" in response.text
        assert "Verdict" in response.text

    return Call({"ticket_id": world.ticket_id}, check=check)


def console_timeline(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert "verified" in response.text
        assert 'data-name="created"' in response.text

    return Call({"ticket_id": world.ticket_id}, check=check)


def console_operations(world: World, caller: Caller) -> Call:
    def check(world: World, caller_tenant: Tenant, response: httpx.Response) -> None:
        assert f"Queue of tenant {caller_tenant.name}" in response.text
        assert "Projection position" in response.text

    return Call(check=check)


# -- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One row: a route, the roles it needs (None: anyone, no token needed), what a caller who
    may pass gets, and what a valid token of another tenant gets (404 when the path names a
    thing of the first tenant; else `ok`, and `build`'s check shows none of its data)."""

    api: Api
    method: str
    path: str
    roles: tuple[str, ...] | None
    ok: int
    build: Build = plain
    other_tenant: int | None = None
    no_token: int = 401

    def expected(self, caller: Caller) -> int:
        if self.roles is None:
            return self.ok
        if caller.defect == "missing":
            return self.no_token
        if caller.defect is not None:
            return 401
        if caller.other_tenant:
            return self.ok if self.other_tenant is None else self.other_tenant
        return self.ok if caller.role in self.roles else 403

    @property
    def label(self) -> str:
        return f"{self.api}: {self.method} {self.path}"


ANY_TOKEN = ROLES
ADMIN = ("admin",)
WRITERS = READERS = ("user", "admin")
HISTORY = ("user", "admin", "auditor")
AUDITORS = ("auditor", "admin")
INTEGRATORS = ("integrator", "admin")

TABLE = [
    # The command API.
    # Anonymous for the first user of a new tenant; else an admin of the tenant in the body.
    Route("commands", "POST", "/auth/register", ADMIN, 201, register, 404, no_token=201),
    Route("commands", "POST", "/auth/login", None, 200, login),
    Route("commands", "POST", "/auth/refresh", None, 200, refresh),
    Route("commands", "POST", "/auth/logout", ANY_TOKEN, 204),
    Route("commands", "GET", "/users/me", ANY_TOKEN, 200, who_am_i),
    Route("commands", "POST", "/users/me/password", ANY_TOKEN, 204, change_password),
    Route("commands", "GET", "/users/{user_id}", ADMIN, 200, on_member, 404),
    Route("commands", "POST", "/users/{user_id}/roles", ADMIN, 200, grant_role, 404),
    Route("commands", "DELETE", "/users/{user_id}/roles/{role}", ADMIN, 200, revoke_role, 404),
    Route("commands", "POST", "/users/{user_id}/deactivate", ADMIN, 200, deactivate, 404),
    # Crypto-shredding and retention (docs/adr/0021-crypto-shredding.md): the admin's own tenant.
    Route("commands", "POST", "/users/{user_id}/erase", ADMIN, 200, erase_user, 404),
    Route("commands", "PUT", "/tenant/retention", ADMIN, 200, set_retention),
    Route("commands", "POST", "/tickets", WRITERS, 202, open_ticket),
    Route("commands", "POST", "/tickets/{ticket_id}/cancel", WRITERS, 202, cancel_ticket, 404),
    Route("commands", "POST", "/tickets/{ticket_id}/questions", WRITERS, 202, ask_question, 404),
    Route(
        "commands",
        "POST",
        "/tickets/{ticket_id}/subtasks/{subtask_id}/retry",
        ADMIN,
        202,
        retry_subtask,
        404,
    ),
    Route("commands", "POST", "/integrations/nats-credentials", INTEGRATORS, 201, nats_creds),
    Route("commands", "GET", "/health", None, 200),
    Route("commands", "GET", "/health/live", None, 200),
    # Process-wide (no tenant's data): an admin of any tenant reads it.
    Route("commands", "GET", "/health/details", ADMIN, 200),
    Route("commands", "GET", "/metrics", ADMIN, 200),
    *(Route("commands", "GET", path, None, 200) for path in DOCS_ROUTES),
    # The query API.
    # Auditors read tickets, reports (now or as_of), explanations and diffs, read-only.
    Route("queries", "GET", "/tickets", HISTORY, 200, list_tickets),
    Route("queries", "GET", "/tickets/{ticket_id}", HISTORY, 200, ticket_detail, 404),
    Route("queries", "GET", "/tickets/{ticket_id}/report", HISTORY, 200, on_ticket, 404),
    Route(
        "queries", "GET", "/tickets/{ticket_id}/cards.apkg", HISTORY, 200, flashcards_package, 404
    ),
    Route("queries", "GET", "/tickets/{ticket_id}/questions", HISTORY, 200, on_ticket, 404),
    Route("queries", "GET", "/tickets/{ticket_id}/explain", HISTORY, 200, explain, 404),
    Route("queries", "GET", "/tickets/{ticket_id}/diff/{other_id}", HISTORY, 200, report_diff, 404),
    Route("queries", "GET", "/tickets/{ticket_id}/events", HISTORY, 200, ticket_history, 404),
    Route("queries", "GET", "/events", AUDITORS, 200, tenant_history),
    # The audit bundle of the caller's own tenant: auditors only (docs/adr/0020-audit-chain.md).
    Route("queries", "GET", "/audit/export", ("auditor",), 200, audit_export),
    # The checkpoint keys: the same for every tenant, public, so any valid token reads them.
    Route("queries", "GET", "/audit/keys", ANY_TOKEN, 200, audit_keys),
    Route("queries", "GET", "/tickets/{ticket_id}/stream", READERS, 200, stream, 404),
    Route("queries", "POST", "/search", READERS, 200, search),
    # The event stream's contract: the same for every tenant, so any valid token reads it.
    Route("queries", "GET", "/asyncapi.json", ANY_TOKEN, 200, asyncapi),
    # The console (read_api/console.py): public page shells and static files; its data
    # fragments are role-checked like the routes they mirror, and retrying is for admins.
    Route("queries", "GET", "/console", None, 200),
    Route("queries", "GET", "/console/login", None, 200),
    Route("queries", "POST", "/console/login", None, 200, console_login),
    Route("queries", "GET", "/console/operations", None, 200),
    Route("queries", "GET", "/console/tickets/{ticket_id}", None, 200, on_ticket),
    Route("queries", "GET", "/console/static/{name}", None, 200, console_static),
    Route("queries", "GET", "/console/fragments/tickets", HISTORY, 200, console_tickets),
    Route(
        "queries",
        "GET",
        "/console/fragments/tickets/{ticket_id}",
        HISTORY,
        200,
        console_ticket,
        404,
    ),
    Route(
        "queries",
        "GET",
        "/console/fragments/tickets/{ticket_id}/timeline",
        HISTORY,
        200,
        console_timeline,
        404,
    ),
    Route("queries", "GET", "/console/fragments/dead-letters", AUDITORS, 200),
    Route("queries", "GET", "/console/fragments/operations", AUDITORS, 200, console_operations),
    Route(
        "queries",
        "POST",
        "/console/actions/tickets/{ticket_id}/subtasks/{subtask_id}/retry",
        ADMIN,
        200,
        retry_subtask,
        404,
    ),
    Route("queries", "GET", "/health", None, 200),
    Route("queries", "GET", "/health/live", None, 200),
    # Process-wide (no tenant's data): an admin of any tenant reads it.
    Route("queries", "GET", "/health/details", ADMIN, 200),
    Route("queries", "GET", "/metrics", ADMIN, 200),
    *(Route("queries", "GET", path, None, 200) for path in DOCS_ROUTES),
]


def mounted_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path template) of every route the app serves. HEAD, which Starlette adds to
    every GET route of its own, is left out where GET is there."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before included routers were resolved lazily
        routes: list[Any] = list(app.routes)
    else:
        routes = list(iter_route_contexts(app.routes))
    mounted: set[tuple[str, str]] = set()
    for route in routes:
        methods = set(getattr(route, "methods", None) or {"*"})
        if "GET" in methods:
            methods.discard("HEAD")
        mounted |= {(method, str(route.path)) for method in methods}
    return mounted


def test_the_table_covers_every_route(world: World) -> None:
    for api in ("commands", "queries"):
        mounted = mounted_routes(world.apis.app(api))
        tabled = {(route.method, route.path) for route in TABLE if route.api == api}
        assert len(tabled) == len([route for route in TABLE if route.api == api])
        assert sorted(mounted - tabled) == [], f"{api} routes missing from the table"
        assert sorted(tabled - mounted) == [], f"{api} table rows for routes it does not serve"


CELLS = [
    pytest.param(route, caller, id=f"{route.label} | {caller.name} -> {route.expected(caller)}")
    for route in TABLE
    for caller in CALLERS
]


def send(world: World, route: Route, call: Call, headers: dict[str, str]) -> httpx.Response:
    client = world.client(route.api)
    path = route.path.format(**call.path_params)
    request = client.build_request(
        route.method, path, json=call.json, files=call.files, headers=headers
    )
    response = client.send(request, stream=True)
    try:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            response.read()
            return response
        # A bounded read: the completed ticket's stream ends after its final event, and a
        # stream that did not would end the read at the client's timeout, not hang.
        lines: list[str] = []
        for line in response.iter_lines():
            lines.append(line)
            if line == "event: completed" or len(lines) > 1000:
                break
    finally:
        response.close()
    content = "\n".join(lines).encode()
    headers = {"content-type": response.headers["content-type"]}
    return httpx.Response(response.status_code, headers=headers, content=content, request=request)


@pytest.mark.parametrize(("route", "caller"), CELLS)
def test_the_route_answers_the_caller_as_the_table_says(
    world: World, route: Route, caller: Caller
) -> None:
    call = route.build(world, caller)
    tenant = world.tenant_of(caller)
    headers: dict[str, str] = {}
    if caller.defect is not None and caller.defect != "missing":
        headers["Authorization"] = f"Bearer {world.bad_token(caller.defect, tenant, call.subject)}"
    elif caller.defect is None:
        roles = (caller.role,) if caller.role else ROLES
        headers["Authorization"] = f"Bearer {world.token(tenant, roles, call.subject)}"

    response = send(world, route, call, headers)

    expected = route.expected(caller)
    assert response.status_code == expected, response.text
    if expected == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"
        code = "unauthenticated" if caller.defect == "missing" else "invalid_token"
        assert response.json()["error"]["code"] == code
    elif expected == 403:
        assert response.json()["error"]["code"] == "forbidden"
    elif expected == 404:
        assert response.json()["error"]["code"].endswith("_not_found")
    elif call.check is not None:
        call.check(world, tenant, response)
