"""One function per process kind: each builds that process's dependencies at start-up.

Nothing here runs at import time; connections are opened inside these functions and closed
when the process stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from nats.aio.client import Client as NATS
from nats.aio.client import RawCredentials
from psycopg_pool import ConnectionPool

from commands.api import CommandApiDeps, UploadLimits, create_app
from commands.application import TicketApplication, persistence_env
from commands.blobs import PostgresBlobStore
from commands.service import CommandService, PipelineCatalog
from commands.write_side import ServiceWriteSide
from identity import api as identity_api
from identity.accounts import AccountService
from identity.api import AccountApiDeps
from identity.integrations import CredentialsUnavailable, Mint
from identity.passwords import HashParameters, Passwords
from identity.retention import RetentionService
from identity.sessions import SessionStore
from identity.subject_keys import SubjectKeyStore
from inference.backends import InferenceBackend
from projections import ProjectionStatus, Projector, RebuildResult, rebuild, status
from projections.outcomes import ReadModelOutcomes
from security.availability import open_redis
from security.idempotency import IDEMPOTENT_ROUTES, IdempotencyMiddleware
from security.limits import RateLimitMiddleware, RateLimitRules, document_rate_limits
from security.metrics import metrics_router
from security.requests import Caller, Identify, RequestSizeLimit
from security.tokens import Authenticator, ExternalTokenVerifier, RevocationUnavailable
from streams.checkpoints import Checkpointer, CheckpointSettings
from streams.contract.eventlog import reset_nothing
from streams.contract.identity import AuthenticationError, Principal
from streams.jetstream import StreamSettings
from streams.relay import Relay, RelaySettings
from ticketflow.audit_keys import audit_signing_key
from ticketflow.auth import JwtCodec
from ticketflow.embedded import running_stack
from ticketflow.metrics import (
    RELAY_LEADER,
    counted_dead_letters,
    refresh_ticket_counts,
    register_tenant_queue,
    sample_consumer,
    sample_lag,
    serve_worker_metrics,
)
from ticketflow.nats_auth import AUTH_DIR, IntegratorSigner, NatsAccessRefused, NatsAuthority
from ticketflow.pipelines import ShippedPipelines
from ticketflow.retention_job import RetentionJob
from ticketflow.settings import Settings
from ticketflow.telemetry import TracingMiddleware, configure_tracing, traced_consumer

if TYPE_CHECKING:
    from handlers.extraction import ExtractionLimits
    from handlers.isolation import ExtractionPool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerUrls:
    database_url: str
    nats_url: str
    redis_url: str
    nats_credentials: Path | None = None


def console_commands_url(settings: Settings) -> str:
    """Where the console of the query API logs in and retries: `TF_CONSOLE_COMMANDS_URL`, else
    the command API of these settings (its port, on the same host)."""
    if settings.console_commands_url:
        return settings.console_commands_url
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host  # noqa: S104
    return f"http://{host}:{settings.commands_port}"


def server_urls(settings: Settings) -> ServerUrls:
    """URLs from the environment, else those of the stack running on the data directory."""
    stack = None if not settings.uses_embedded_servers else running_stack(settings.data_dir)
    if stack is not None:
        update: dict[str, object] = {
            "database_url": settings.database_url or stack.database_url,
            "nats_url": settings.nats_url or stack.nats_url,
            "redis_url": settings.redis_url or stack.redis_url,
        }
        if not settings.nats_url and stack.nats_credentials:
            update["nats_credentials"] = settings.nats_credentials or Path(stack.nats_credentials)
        settings = settings.model_copy(update=update)
    database_url, nats_url, redis_url = settings.require_urls()
    return ServerUrls(database_url, nats_url, redis_url, settings.nats_credentials)


def stream_settings(settings: Settings) -> StreamSettings:
    return StreamSettings(
        name=settings.stream_name,
        replicas=settings.stream_replicas,
        storage=settings.stream_storage,
        max_age_s=settings.stream_max_age_days * 24 * 3600,
        duplicate_window_s=settings.stream_duplicate_window_s,
    )


def jwt_codec(settings: Settings) -> JwtCodec:
    return JwtCodec(
        settings.jwt_secret,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        ttl_s=settings.access_token_ttl_s,
    )


def external_identity(settings: Settings) -> ExternalTokenVerifier | None:
    """The identity provider's token verifier, when `TF_JWKS_URL` is set (keys load lazily)."""
    if settings.jwks_url is None:
        return None
    # Settings refuse a JWKS URL without an issuer and an audience.
    assert settings.jwks_issuer
    assert settings.jwks_audience
    return ExternalTokenVerifier(
        settings.jwks_url,
        issuer=settings.jwks_issuer,
        audience=settings.jwks_audience,
        tenant_claim=settings.jwks_tenant_claim,
        roles_claim=settings.jwks_roles_claim,
        cache_s=settings.jwks_cache_s,
    )


def session_store(settings: Settings, redis: aioredis.Redis) -> SessionStore:
    return SessionStore(
        redis, refresh_ttl_s=settings.refresh_token_ttl_s, max_age_s=settings.session_max_age_s
    )


def authenticator(settings: Settings, redis: aioredis.Redis) -> Authenticator:
    """Bearer token → principal for both APIs: our tokens, the identity provider's, revocations."""
    return Authenticator(
        jwt_codec(settings), session_store(settings, redis), external_identity(settings)
    )


def open_authenticator(
    settings: Settings,
) -> Callable[[], AbstractAsyncContextManager[Authenticator]]:
    """An `authenticator` with a Redis connection of its own, opened and closed by the caller."""

    @asynccontextmanager
    async def opened() -> AsyncIterator[Authenticator]:
        redis = open_redis(server_urls(settings).redis_url, timeout_s=settings.redis_timeout_s)
        try:
            yield authenticator(settings, redis)
        finally:
            await redis.aclose()

    return opened


def passwords(settings: Settings) -> Passwords:
    return Passwords(
        min_length=settings.password_min_length,
        parameters=HashParameters(
            time_cost=settings.password_hash_time_cost,
            memory_kib=settings.password_hash_memory_kib,
            parallelism=settings.password_hash_parallelism,
        ),
    )


def retention_service(settings: Settings, database_url: str) -> RetentionService:
    """Tenants' retention settings and the purge of what they no longer keep."""
    return RetentionService(_application(database_url, 2, settings.db_acquire_timeout_s))


def account_service(settings: Settings, database_url: str) -> AccountService:
    """Users and tenants: registration, passwords, roles. The caller closes it."""
    return AccountService(
        _application(database_url, 2, settings.db_acquire_timeout_s),
        passwords(settings),
        open_registration=settings.tenant_registration == "open",
    )


@dataclass
class _GuardResources:
    """What the request guards use: opened with an API's resources at start-up, while the
    middleware itself is built with the app, before start-up."""

    redis: aioredis.Redis | None = None
    authenticate: Callable[[str], Awaitable[Principal]] | None = None

    def open(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.authenticate = authenticator(settings, redis)

    def close(self) -> None:
        self.redis = self.authenticate = None

    def redis_client(self) -> aioredis.Redis | None:
        return self.redis

    async def identify(self, token: str) -> Caller | None:
        """The caller, by the same verifier the app uses; None is limited per client IP and
        left to the app to answer (401, or 503 when revocations cannot be read)."""
        if self.authenticate is None:
            return None
        try:
            principal = await self.authenticate(token)
        except (AuthenticationError, RevocationUnavailable):
            return None
        return principal.subject, principal.tenant


def install_request_guards(
    app: FastAPI,
    settings: Settings,
    redis: Callable[[], aioredis.Redis | None],
    identify: Identify,
    *,
    max_request_bytes: int,
    idempotent_routes: tuple[str, ...] = (),
) -> None:
    """From the outside in: rate limits, the body cap, then idempotent replays (which buffer
    bodies the cap has already bounded). See docs/adr/0011-limits.md."""
    # A little longer than the client's own socket timeout, which then fires first and tells
    # the client that Redis is away (so the next calls fail at once).
    redis_timeout_s = settings.redis_timeout_s + 0.25
    if idempotent_routes:
        app.add_middleware(
            IdempotencyMiddleware,
            redis=redis,
            identify=identify,
            routes=idempotent_routes,
            max_body_bytes=max_request_bytes,
            ttl_s=settings.idempotency_ttl_s,
            lease_s=settings.idempotency_lease_s,
            timeout_s=redis_timeout_s,
        )
    app.add_middleware(RequestSizeLimit, max_bytes=max_request_bytes)
    if settings.rate_limits_enabled:
        rules = RateLimitRules.with_defaults(settings.rate_limits)
        app.add_middleware(
            RateLimitMiddleware,
            redis=redis,
            identify=identify,
            rules=rules,
            timeout_s=redis_timeout_s,
        )
        document_rate_limits(app, rules)


async def connect_nats(
    url: str, name: str, credentials: Path | str | None = None, *, client: NATS | None = None
) -> NATS:
    """The one way ticketflow connects to NATS (with `client`, if given, else a new client).

    `credentials` is a `.creds` file, or the text of one. The first connect, and the connection
    once established, retry for ever every half second, and subscriptions (pull consumers'
    included) carry over to a new connection; refused credentials at the first connect raise
    `NatsAccessRefused` at once. One warning while the server cannot be reached, one line when
    it is back.
    """
    nc = client or NATS()
    connected = False
    outage_logged = False

    async def on_error(error: Exception) -> None:
        nonlocal outage_logged
        if not connected and "authorization violation" in str(error).lower():
            raise NatsAccessRefused(url, name, credentials is not None)
        if not nc.is_connected:
            # Each failed connect attempt reports here: say it once per outage.
            if not outage_logged:
                logger.warning(
                    "nats %s: %s: %s", name, "reconnecting" if connected else "connecting", error
                )
            outage_logged = True
            return
        logger.warning("nats %s: %s", name, error)

    async def on_disconnected() -> None:
        if connected and not nc.is_closed:
            logger.warning("nats %s: connection lost, reconnecting", name)

    async def on_reconnected() -> None:
        nonlocal outage_logged
        outage_logged = False
        logger.info("nats %s: reconnected", name)

    user_credentials: RawCredentials | str | None = None
    if isinstance(credentials, str) and "BEGIN NATS USER JWT" in credentials:
        user_credentials = RawCredentials(credentials)
    elif credentials is not None:
        user_credentials = str(credentials)
    try:
        await nc.connect(
            # Several comma-separated URLs: the seeds of a cluster; the client learns the rest.
            servers=[part.strip() for part in url.split(",") if part.strip()],
            name=name,
            user_credentials=user_credentials,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,  # type: ignore[arg-type]  # seconds; annotated int
            connect_timeout=5,
            # A server that stops answering (hung, or a network that drops packets) is given
            # up after about 30 s instead of the default four minutes.
            ping_interval=10,
            max_outstanding_pings=3,
        )
    except NatsAccessRefused:
        await nc.close()
        raise
    connected = True
    if outage_logged:
        logger.info("nats %s: connected", name)
    outage_logged = False
    return nc


async def connect_nats_in_background(
    url: str, name: str, credentials: Path | str | None, *, wait_s: float = 5.0
) -> tuple[NATS, asyncio.Task[NATS]]:
    """A client that is connected, or still connecting in the background when the server does
    not answer within `wait_s` (the caller reports it through `is_connected`). Refused
    credentials within `wait_s` raise, as from `connect_nats`."""
    nc = NATS()
    connecting = asyncio.ensure_future(connect_nats(url, name, credentials, client=nc))
    done, _ = await asyncio.wait({connecting}, timeout=wait_s)
    if done:
        connecting.result()
    else:
        logger.warning("nats %s: not reachable yet; starting without it", name)
    return nc, connecting


async def close_nats_connecting(nc: NATS, connecting: asyncio.Task[NATS]) -> None:
    """Stop a connect that has not finished, then close as `close_nats` does."""
    if not connecting.done():
        connecting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await connecting
    await close_nats(nc)


def command_service(
    settings: Settings,
    database_url: str,
    pipelines: PipelineCatalog | None = None,
    *,
    acquire_timeout_s: float = 10.0,
) -> CommandService:
    """The write side: the only writer of events. The caller closes it.

    A command waits at most `acquire_timeout_s` for a database connection (the APIs wait
    `db_acquire_timeout_s`, then answer 503); connections are checked before use, so the pools
    carry on with fresh ones once a restarted PostgreSQL is back."""
    pool = ConnectionPool(
        database_url,
        min_size=1,
        max_size=settings.db_pool_size,
        open=True,
        name="commands",
        timeout=acquire_timeout_s,
        check=ConnectionPool.check_connection,
        reconnect_timeout=_RECONNECT_FOR_EVER_S,
    )
    app = _application(database_url, settings.db_pool_size, acquire_timeout_s)
    return CommandService(
        app, PostgresBlobStore(pool), pipelines or ShippedPipelines(), pool, SubjectKeyStore(pool)
    )


# psycopg_pool gives up a connection it could not re-establish after `reconnect_timeout`
# (5 minutes by default); a process that waits out a long outage keeps trying instead.
_RECONNECT_FOR_EVER_S = 365 * 24 * 3600.0


def _application(database_url: str, pool_size: int, acquire_timeout_s: float) -> TicketApplication:
    env = persistence_env(database_url, pool_size=pool_size)
    # The library waits this long (whole seconds) for a connection from its pool.
    env["POSTGRES_CONNECT_TIMEOUT"] = str(max(1, math.ceil(acquire_timeout_s)))
    return TicketApplication(env=env)


def integrator_signer(settings: Settings) -> IntegratorSigner:
    """The key that signs integrators' NATS credentials: the settings', else the stack's own.

    Raises `LookupError` when neither is there (production without TF_NATS_INTEGRATOR_SEED_FILE,
    or no stack ever started on the data directory).
    """
    if settings.nats_integrator_seed_file is not None:
        return IntegratorSigner.load(
            settings.nats_integrator_seed_file, settings.nats_integrator_account
        )
    if not settings.nats_url:
        stack = running_stack(settings.data_dir)
        if stack is not None and stack.nats_integrator_seed_file:
            return IntegratorSigner.load(
                Path(stack.nats_integrator_seed_file), stack.nats_integrator_account or None
            )
        with contextlib.suppress(FileNotFoundError):
            return NatsAuthority.load(settings.data_dir.resolve() / AUTH_DIR).signer()
    raise LookupError(
        "no key to sign integrator credentials with: set TF_NATS_INTEGRATOR_SEED_FILE "
        "(and TF_NATS_INTEGRATOR_ACCOUNT for a signing key), or start a stack with `ticketflow up`"
    )


def nats_credentials_minter(settings: Settings) -> Callable[[Principal], str]:
    """Mints an integrator's NATS credentials for the caller's tenant (the command API's route).

    The signing key is read on first use, so the API starts even where none is configured; the
    route then answers 503.
    """
    signer: IntegratorSigner | None = None
    ttl = timedelta(seconds=settings.nats_integrator_ttl_s)

    def mint(principal: Principal) -> str:
        nonlocal signer
        if signer is None:
            try:
                signer = integrator_signer(settings)
            except (LookupError, OSError, ValueError) as error:
                raise CredentialsUnavailable(str(error)) from error
        return signer.credentials(principal.tenant, principal.subject, ttl)

    return mint


def _quietly(what: str, close: Callable[[], object]) -> None:
    """Close `what`; a failure is logged, so that shutting down goes on to the next resource."""
    try:
        close()
    except Exception as error:
        logger.warning("closing %s failed: %s: %s", what, type(error).__name__, error)


async def _aquietly(what: str, close: Callable[[], Awaitable[object]]) -> None:
    try:
        await close()
    except Exception as error:
        logger.warning("closing %s failed: %s: %s", what, type(error).__name__, error)


async def close_nats(nc: NATS, timeout_s: float = 10.0) -> None:
    """Drain `nc` (deliver what is buffered, then close) when it is connected, else close it;
    never raises, and never waits longer than `timeout_s`."""
    try:
        if nc.is_connected:
            await asyncio.wait_for(nc.drain(), timeout_s)
    except Exception as error:
        logger.warning("draining NATS failed: %s: %s", type(error).__name__, error)
    if not nc.is_closed:
        await _aquietly("NATS", nc.close)


def command_app(
    resources: Callable[[], AbstractAsyncContextManager[CommandApiDeps]],
    mint_nats_credentials: Mint | None = None,
    *,
    docs: bool = True,
) -> FastAPI:
    """The command API with the account routes (`identity`) mounted beside the ticket routes,
    and `POST /integrations/nats-credentials` when `mint_nats_credentials` is given."""
    return create_app(
        resources,
        routers=identity_api.routers(mint_nats_credentials),
        error_statuses=identity_api.ERROR_STATUSES,
        docs=docs,
    )


def commands_api(settings: Settings) -> FastAPI:
    """The command HTTP API process."""
    configure_tracing("ticketflow-commands")
    guards = _GuardResources()

    @asynccontextmanager
    async def resources() -> AsyncIterator[CommandApiDeps]:
        urls = server_urls(settings)
        # Everything opened is closed at shutdown, each even when closing another failed.
        async with contextlib.AsyncExitStack() as opened:
            service = await asyncio.to_thread(
                command_service,
                settings,
                urls.database_url,
                acquire_timeout_s=settings.db_acquire_timeout_s,
            )
            opened.callback(_quietly, "the command service", service.close)
            accounts = await asyncio.to_thread(account_service, settings, urls.database_url)
            opened.callback(_quietly, "the account service", accounts.close)
            retention = await asyncio.to_thread(retention_service, settings, urls.database_url)
            opened.callback(_quietly, "the retention service", retention.close)
            # The API serves without NATS (only /health needs it), so it does not wait for it.
            nc, connecting = await connect_nats_in_background(
                urls.nats_url, "ticketflow-commands", urls.nats_credentials
            )
            opened.push_async_callback(close_nats_connecting, nc, connecting)
            cache = open_redis(urls.redis_url, timeout_s=settings.redis_timeout_s)
            opened.push_async_callback(_aquietly, "Redis", cache.aclose)
            guards.open(settings, cache)
            opened.callback(guards.close)

            # Prefer: wait reads the read models, on connections made on first use.
            read_models = await asyncpg.create_pool(
                urls.database_url,
                min_size=0,
                max_size=2,
                timeout=_CONNECT_TIMEOUT_S,
                server_settings={"application_name": "ticketflow-commands-wait"},
            )
            opened.push_async_callback(_aquietly, "the read-model pool", read_models.close)
            outcomes = ReadModelOutcomes(
                read_models,
                lambda: asyncpg.connect(urls.database_url, timeout=_CONNECT_TIMEOUT_S),
            )
            opened.push_async_callback(_aquietly, "the outcome listener", outcomes.close)

            async def database() -> None:
                await asyncio.to_thread(service.ping)

            async def nats_server() -> None:
                if not nc.is_connected:
                    raise ConnectionError("not connected")
                await nc.jetstream().account_info()

            yield CommandApiDeps(
                service=service,
                authenticate=authenticator(settings, cache),
                health_checks={"database": database, "nats": nats_server, "redis": cache.ping},
                limits=UploadLimits(
                    max_document_bytes=settings.max_upload_bytes,
                    max_documents=settings.max_documents_per_ticket,
                    max_options_bytes=settings.max_options_bytes,
                ),
                accounts=AccountApiDeps(
                    service=accounts,
                    sessions=session_store(settings, cache),
                    tokens=jwt_codec(settings),
                    retention=retention,
                ),
                outcomes=outcomes,
                max_wait_s=settings.submit_max_wait_s,
            )

    app = command_app(resources, nats_credentials_minter(settings), docs=settings.serves_api_docs)
    install_request_guards(
        app,
        settings,
        guards.redis_client,
        guards.identify,
        max_request_bytes=settings.command_request_cap,
        idempotent_routes=IDEMPOTENT_ROUTES,
    )
    app.include_router(metrics_router())
    # Outermost: the request's span covers the guards too (a 429 is traced).
    app.add_middleware(TracingMiddleware)
    return app


def queries_api(settings: Settings) -> FastAPI:
    """The query HTTP API process."""
    configure_tracing("ticketflow-queries")
    from inference.embeddings import SentenceTransformerEmbedder
    from projections.history import fold_into_temporary_tables
    from read_api.console import configure_console
    from read_api.wiring import query_api

    guards = _GuardResources()

    def redis() -> aioredis.Redis:
        client = guards.redis_client()
        if client is None:
            raise ConnectionError("Redis is not connected")
        return client

    @asynccontextmanager
    async def shared_authenticator() -> AsyncIterator[Authenticator]:
        # The app's token verifier uses the process's one Redis client, which the guards hold.
        yield authenticator(settings, redis())

    async def redis_server() -> None:
        await redis().ping()

    app = query_api(
        lambda: server_urls(settings).database_url,
        shared_authenticator,
        # Only search needs the model: a (re)started query API serves before it is loaded.
        lambda: SentenceTransformerEmbedder().load_in_background(),
        pool_size=settings.db_pool_size,
        docs=settings.serves_api_docs,
        health_checks={"redis": redis_server},
        history=fold_into_temporary_tables,
    )
    configure_console(app, commands_url=console_commands_url(settings), redis=redis)
    serve = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        client = open_redis(server_urls(settings).redis_url, timeout_s=settings.redis_timeout_s)
        guards.open(settings, client)
        try:
            async with serve(app) as state:
                yield state
        finally:
            guards.close()
            await _aquietly("Redis", client.aclose)

    app.router.lifespan_context = lifespan
    install_request_guards(
        app,
        settings,
        guards.redis_client,
        guards.identify,
        max_request_bytes=settings.max_query_request_bytes,
    )

    async def ticket_counts(request: Request) -> None:
        await refresh_ticket_counts(request.app.state.deps.pool)

    app.include_router(metrics_router(ticket_counts))
    app.add_middleware(TracingMiddleware)
    return app


async def run_relay(settings: Settings, stop: asyncio.Event) -> None:
    """The relay process: event store → JetStream. It waits out outages of either (see
    `Relay.run`); its pool connects on first use, so it also starts while PostgreSQL is away."""
    configure_tracing("ticketflow-relay")
    urls = server_urls(settings)
    pool = await asyncpg.create_pool(
        urls.database_url,
        min_size=0,
        max_size=4,
        timeout=_CONNECT_TIMEOUT_S,
        server_settings={"application_name": "ticketflow-relay"},
        reset=reset_nothing,  # as the projector's pool
    )
    try:
        nc = await connect_nats(urls.nats_url, "ticketflow-relay", urls.nats_credentials)
        try:
            relay = Relay(
                pool,
                nc,
                stream_settings(settings),
                RelaySettings(
                    max_in_flight=settings.relay_max_in_flight,
                    batch_size=settings.relay_batch_size,
                ),
            )
            # The relay process also signs the tenants' chain heads (docs/adr/0020-audit-chain.md)
            # and purges the documents tenants no longer keep (docs/adr/0021-crypto-shredding.md).
            signer = checkpointer(settings, pool)
            retention = RetentionJob(
                lambda: retention_service(settings, urls.database_url),
                pool,
                settings.retention_interval_s,
            )
            RELAY_LEADER.set_function(lambda: 1.0 if relay.leading else 0.0)
            serve_worker_metrics(settings, "relay")

            async def lag(stop: asyncio.Event) -> None:
                await sample_lag(pool, "relay", lambda: relay.position, stop)

            runs = (relay.run, signer.run, retention.run, lag)
            tasks = [asyncio.ensure_future(run(stop)) for run in runs]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:  # one failed: the others stop too
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.to_thread(_quietly, "the retention service", retention.close)
        finally:
            await close_nats(nc)
    finally:
        await pool.close()


def checkpointer(settings: Settings, pool: asyncpg.Pool) -> Checkpointer:
    """Signs every tenant's chain head at the intervals the settings give."""
    return Checkpointer(
        pool,
        audit_signing_key(settings),
        CheckpointSettings(
            every_events=settings.audit_checkpoint_events,
            every_s=settings.audit_checkpoint_interval_s,
        ),
    )


_CONNECT_TIMEOUT_S = 5.0
"""How long an asyncpg connect may take before it counts as the database being away."""


async def _projection_pool(
    settings: Settings,
    application_name: str,
    *,
    min_size: int = 2,
    reset: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
) -> asyncpg.Pool:
    # The application name lets operators (and tests) tell these connections apart.
    return await asyncpg.create_pool(
        server_urls(settings).database_url,
        min_size=min_size,
        max_size=4,
        timeout=_CONNECT_TIMEOUT_S,
        server_settings={"application_name": application_name},
        reset=reset,
    )


async def run_projector(settings: Settings, stop: asyncio.Event) -> None:
    """The projector process: event store → read models. It waits out database outages (see
    `Projector.run`); its pool connects on first use, so it also starts while PostgreSQL is
    away."""
    configure_tracing("ticketflow-projector")
    # Its batches leave nothing on their connections, and its leader gives back its lock and
    # LISTEN itself: no reset query on every release.
    pool = await _projection_pool(settings, "ticketflow-projector", min_size=0, reset=reset_nothing)
    try:
        projector = Projector(pool)
        serve_worker_metrics(settings, "projector")
        await _together(
            stop,
            projector.run,
            lambda stop: sample_lag(pool, "projector", lambda: projector.position, stop),
        )
    finally:
        await pool.close()


async def _together(stop: asyncio.Event, *runs: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run each of `runs` until `stop`; when one fails, the others are cancelled."""
    tasks = [asyncio.ensure_future(run(stop)) for run in runs]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def rebuild_projections(
    settings: Settings, progress: Callable[[int, int], None] | None = None
) -> RebuildResult:
    """Replays the whole log into new read-model tables and swaps them in."""
    pool = await _projection_pool(settings, "ticketflow-rebuild")
    try:
        return await rebuild(pool, progress=progress)
    finally:
        await pool.close()


async def projection_status(settings: Settings) -> list[ProjectionStatus]:
    pool = await asyncpg.create_pool(server_urls(settings).database_url, min_size=1, max_size=1)
    try:
        return await status(pool)
    finally:
        await pool.close()


@asynccontextmanager
async def _worker_resources(
    settings: Settings, name: str
) -> AsyncIterator[tuple[ServerUrls, CommandService, asyncpg.Pool, NATS]]:
    urls = server_urls(settings)
    async with contextlib.AsyncExitStack() as opened:
        service = await asyncio.to_thread(command_service, settings, urls.database_url)
        opened.callback(_quietly, "the command service", service.close)
        pool = await asyncpg.create_pool(
            urls.database_url,
            min_size=1,
            max_size=settings.db_pool_size,
            timeout=_CONNECT_TIMEOUT_S,
        )
        opened.push_async_callback(_aquietly, "the database pool", pool.close)
        nc = await connect_nats(urls.nats_url, name, urls.nats_credentials)
        opened.push_async_callback(close_nats, nc)
        yield urls, service, pool, nc


def extraction_limits(settings: Settings) -> ExtractionLimits:
    """The bounds a document is read within, wherever it is read."""
    from handlers.extraction import ExtractionLimits

    return ExtractionLimits(
        max_bytes=settings.max_upload_bytes,
        max_pages=settings.max_pages,
        max_characters=settings.max_characters,
        max_docx_uncompressed_bytes=settings.max_docx_uncompressed_bytes,
        max_pdf_decoded_bytes=settings.max_pdf_decoded_bytes,
    )


def extraction_pool(settings: Settings, workers: int) -> ExtractionPool:
    """Isolated processes that read documents, with the configured time and memory limits."""
    from handlers.isolation import ExtractionPool

    return ExtractionPool(
        workers=workers,
        timeout_s=settings.ingest_timeout_s,
        memory_bytes=settings.extraction_memory_bytes,
    )


async def run_ingest_worker(settings: Settings, stop: asyncio.Event) -> None:
    """The ingest worker: created tickets → extracted, chunked, embedded documents."""
    from handlers.consumer import ConsumerSettings, JetStreamWorker
    from handlers.ingest import DocumentTexts, IngestHandler, IngestSettings
    from inference.embeddings import SentenceTransformerEmbedder
    from inference.retrieval import ChunkStore
    from streams.contract.subjects import event_filter

    configure_tracing("ticketflow-ingest")
    embedder = await asyncio.to_thread(SentenceTransformerEmbedder().load)
    async with _worker_resources(settings, "ticketflow-ingest") as (_, service, pool, nc):
        handler = IngestHandler(
            ServiceWriteSide(service),
            ChunkStore(pool),
            DocumentTexts(pool),
            embedder,
            extraction_pool(settings, settings.ingest_concurrency),
            IngestSettings(limits=extraction_limits(settings)),
        )
        worker = JetStreamWorker(
            nc.jetstream(),
            ConsumerSettings(
                durable="ingest",
                filter_subject=event_filter("created"),
                stream=settings.stream_name,
                concurrency=settings.ingest_concurrency,
                ack_wait_s=settings.ingest_ack_wait_s,
                job_timeout_s=settings.ingest_timeout_s * 3,
                dead_letter_replicas=settings.stream_replicas,
            ),
            traced_consumer("ingest", handler),
            counted_dead_letters("ingest", handler.fail),
        )
        serve_worker_metrics(settings, "ingest")
        js = nc.jetstream()
        await _together(
            stop,
            worker.run,
            lambda stop: sample_consumer(js, settings.stream_name, "ingest", stop),
        )


def inference_backend(settings: Settings) -> InferenceBackend:
    """The configured inference backend, not loaded or connected yet; the caller closes it."""
    from inference.backends import LlamaCppBackend

    if settings.inference_backend == "llama-cpp":
        return LlamaCppBackend(
            settings.model_path,
            n_threads=settings.inference_threads,
            hash_cache_dir=settings.data_dir,
        )
    from inference.sglang import OpenAICompatibleBackend, SGLangBackend

    if settings.inference_backend == "sglang":
        return SGLangBackend(
            settings.sglang_urls,
            chat_template=settings.sglang_chat_template,
            model=settings.sglang_model,
            connect_timeout_s=settings.inference_connect_timeout_s,
            read_timeout_s=settings.inference_http_timeout_s,
            max_connections=settings.inference_max_connections,
        )
    return OpenAICompatibleBackend(
        settings.sglang_urls,
        model=settings.sglang_model,
        response_format=settings.openai_response_format,
        connect_timeout_s=settings.inference_connect_timeout_s,
        read_timeout_s=settings.inference_http_timeout_s,
        max_connections=settings.inference_max_connections,
    )


async def run_inference_worker(
    settings: Settings, stop: asyncio.Event, *, backend: InferenceBackend | None = None
) -> None:
    """The inference worker: ready subtasks → validated outputs, on the configured backend.

    `backend` replaces the configured one (benchmarks wrap the real backend this way).
    """
    from handlers.consumer import ConsumerSettings
    from handlers.cooldown import ModelCooldown
    from handlers.fairness import TenantSlots
    from handlers.inference import InferenceHandler, InferenceSettings
    from handlers.ingest import DocumentTexts
    from handlers.postprocess import OutputPostprocessor
    from handlers.scheduler import InferenceScheduler, SchedulerSettings
    from inference.backends import LlamaCppBackend
    from inference.embeddings import SentenceTransformerEmbedder
    from inference.flashcards import FlashcardStore
    from inference.retrieval import ChunkStore
    from inference.sglang import HttpInferenceBackend
    from streams.contract.subjects import event_filter

    configure_tracing("ticketflow-inference")
    # Who runs an attempt, as its SubtaskStarted records it: the copies on one machine apart.
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    embedder = await asyncio.to_thread(SentenceTransformerEmbedder().load)
    backend = backend or inference_backend(settings)
    if isinstance(backend, LlamaCppBackend):
        await asyncio.to_thread(backend.load)
    elif isinstance(backend, HttpInferenceBackend):
        await backend.start()
    try:
        async with (
            _worker_resources(settings, "ticketflow-inference") as (urls, service, pool, nc),
            open_redis(urls.redis_url, timeout_s=settings.redis_timeout_s) as redis,
        ):
            handler = InferenceHandler(
                ServiceWriteSide(service),
                backend,
                ChunkStore(pool),
                DocumentTexts(pool),
                embedder,
                InferenceSettings(
                    max_document_chars=settings.max_prompt_document_chars, worker=worker_id
                ),
                postprocessor=OutputPostprocessor(
                    FlashcardStore(pool),
                    embedder,
                    max_document_chars=settings.max_prompt_document_chars,
                ),
            )
            worker = InferenceScheduler(
                nc.jetstream(),
                ConsumerSettings(
                    durable="inference",
                    filter_subject=event_filter("subtask_ready"),
                    stream=settings.stream_name,
                    concurrency=settings.inference_concurrency,
                    max_deliver=settings.inference_max_deliver,
                    ack_wait_s=settings.inference_ack_wait_s,
                    job_timeout_s=settings.inference_timeout_s,
                    dead_letter_replicas=settings.stream_replicas,
                ),
                handler,
                settings=SchedulerSettings(
                    concurrency=settings.inference_concurrency,
                    buffer=settings.inference_buffer,
                    interactive_max_chars=settings.interactive_max_chars,
                    promote_after_s=settings.bulk_promote_after_s,
                ),
                slots=TenantSlots(
                    redis,
                    limit=settings.inference_tenant_concurrency,
                    limits=settings.inference_tenant_limits,
                    lease_s=max(30.0, settings.inference_ack_wait_s),
                ),
                cooldown=ModelCooldown(redis),
                worker=worker_id,
            )
            register_tenant_queue(worker.queue.depths)
            serve_worker_metrics(settings, "inference")
            js = nc.jetstream()
            await _together(
                stop,
                worker.run,
                lambda stop: sample_consumer(js, settings.stream_name, "inference", stop),
            )
    finally:
        await backend.aclose()
