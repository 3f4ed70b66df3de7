"""The `ticketflow` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ticketflow import logs
from ticketflow.settings import Settings

logger = logging.getLogger("ticketflow")
console = Console(stderr=True)
app = typer.Typer(no_args_is_help=True, add_completion=False, help="ticketflow: AI document tickets.")
serve_app = typer.Typer(no_args_is_help=True, help="Run an HTTP API.")
worker_app = typer.Typer(no_args_is_help=True, help="Run a background worker.")
contract_app = typer.Typer(no_args_is_help=True, help="The event contract for integrators.")
app.add_typer(serve_app, name="serve")
app.add_typer(worker_app, name="worker")
app.add_typer(contract_app, name="contract")


def _settings() -> Settings:
    try:
        return Settings()
    except ValueError as error:
        console.print(f"[red]invalid settings:[/red] {error}")
        raise typer.Exit(2) from None


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option(envvar="TF_LOG_LEVEL", help="Log level.")] = "INFO",
) -> None:
    logs.configure(log_level.upper())


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@app.command()
def up(
    data_dir: Annotated[
        Path | None, typer.Option(help="Where the embedded servers keep their data.")
    ] = None,
) -> None:
    """Start the whole stack: embedded servers, migrations, the command API and the relay."""
    from migrations import apply_migrations
    from ticketflow.embedded import EmbeddedServers, StackAlreadyRunning, StackInfo
    from ticketflow.supervisor import Supervisor

    settings = _settings()
    if data_dir is not None:
        settings = settings.model_copy(update={"data_dir": data_dir})
    data = settings.data_dir.resolve()
    data.mkdir(parents=True, exist_ok=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    servers: EmbeddedServers | None = None
    if settings.uses_embedded_servers:
        servers = EmbeddedServers(
            data, nats_port=settings.embedded_nats_port, redis_port=settings.embedded_redis_port
        )
        try:
            servers.start()
        except StackAlreadyRunning as error:
            console.print(f"[yellow]{error}[/yellow]; stop it first or use another --data-dir")
            raise typer.Exit(1) from None
    try:
        database_url = settings.database_url or (servers.database_url if servers else "")
        nats_url = settings.nats_url or (servers.nats_url if servers else "")
        redis_url = settings.redis_url or (servers.redis_url if servers else "")
        applied = apply_migrations(database_url)
        if applied:
            logger.info("applied migrations: %s", ", ".join(applied))
        if not _port_is_free(settings.host, settings.commands_port):
            console.print(
                f"[red]port {settings.commands_port} is in use[/red]; "
                "set TF_COMMANDS_PORT to a free port"
            )
            raise typer.Exit(1)
        commands_url = f"http://{settings.host}:{settings.commands_port}"
        StackInfo(
            pid=os.getpid(),
            database_url=database_url,
            nats_url=nats_url,
            redis_url=redis_url,
            commands_url=commands_url,
        ).write(data)
        env = {
            **os.environ,
            "TF_DATABASE_URL": database_url,
            "TF_NATS_URL": nats_url,
            "TF_REDIS_URL": redis_url,
            "TF_DATA_DIR": str(data),
        }
        supervisor = Supervisor(data / "logs", env)
        supervisor.add("commands", "serve", "commands")
        supervisor.add("relay", "worker", "relay")
        supervisor.start()
        console.print("[green]ticketflow is up[/green]")
        console.print(f"  command API  {commands_url}  (docs: {commands_url}/docs)")
        console.print(f"  NATS         {nats_url}  (stream {settings.stream_name})")
        console.print(f"  Redis        {redis_url}")
        console.print(f"  PostgreSQL   {database_url}")
        console.print(f"  data         {data}   logs: {data / 'logs'}")
        console.print("Press Ctrl-C to stop.")
        try:
            while not stop.wait(0.5):
                supervisor.poll()
        finally:
            console.print("stopping…")
            supervisor.stop()
    finally:
        if servers is not None:
            servers.stop()
    console.print("stopped")


@app.command()
def migrate() -> None:
    """Apply pending database migrations (safe to run from several processes at once)."""
    from migrations import apply_migrations
    from ticketflow.bootstrap import server_urls

    applied = apply_migrations(server_urls(_settings()).database_url)
    console.print(f"applied: {', '.join(applied)}" if applied else "database is up to date")


@app.command()
def token(
    tenant: Annotated[str, typer.Option(help="Tenant slug, e.g. acme.")],
    user: Annotated[str, typer.Option(help="User id (the `sub` claim).")],
    role: Annotated[list[str] | None, typer.Option(help="Role; repeat for several.")] = None,
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 3600,
) -> None:
    """Mint a development access token (HS256 with TF_JWT_SECRET)."""
    from ticketflow.bootstrap import jwt_codec

    try:
        minted = jwt_codec(_settings()).mint(
            subject=user, tenant=tenant, roles=role or ["user"], ttl_s=ttl
        )
    except ValueError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    typer.echo(minted)


@serve_app.command("commands")
def serve_commands(
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """The command HTTP API."""
    import uvicorn

    from ticketflow.bootstrap import commands_api

    settings = _settings()
    uvicorn.run(
        commands_api(settings),
        host=host or settings.host,
        port=port or settings.commands_port,
        log_config=None,
        timeout_graceful_shutdown=10,
    )


def _run_until_signalled(main: object) -> None:
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)  # type: ignore[operator]

    asyncio.run(runner())


@worker_app.command("relay")
def worker_relay() -> None:
    """Publish every recorded event to JetStream, in order."""
    from ticketflow.bootstrap import run_relay

    settings = _settings()
    _run_until_signalled(lambda stop: run_relay(settings, stop))


@contract_app.command("schemas")
def contract_schemas() -> None:
    """Print the JSON Schema of every event payload, keyed by topic."""
    from streams.contract import json_schemas

    json.dump(json_schemas(), sys.stdout, indent=2)
    sys.stdout.write("\n")


def main() -> None:
    app()
