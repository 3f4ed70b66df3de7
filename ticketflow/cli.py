"""The `ticketflow` command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape

from ticketflow import logs
from ticketflow.audit_cli import audit_app
from ticketflow.audit_history_cli import register as register_audit_history
from ticketflow.embedded import StackInfo
from ticketflow.privacy_cli import register as register_privacy
from ticketflow.settings import Settings

logger = logging.getLogger("ticketflow")
console = Console(stderr=True)
app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="ticketflow: AI document tickets."
)
serve_app = typer.Typer(no_args_is_help=True, help="Run an HTTP API.")
worker_app = typer.Typer(no_args_is_help=True, help="Run a background worker.")
contract_app = typer.Typer(no_args_is_help=True, help="The event contract for integrators.")
projections_app = typer.Typer(no_args_is_help=True, help="The read models and their positions.")
streams_app = typer.Typer(no_args_is_help=True, help="The JetStream copy of the event store.")
nats_app = typer.Typer(no_args_is_help=True, help="NATS credentials for integrators.")
inference_app = typer.Typer(no_args_is_help=True, help="Inference servers for GPU machines.")
app.add_typer(serve_app, name="serve")
app.add_typer(worker_app, name="worker")
app.add_typer(contract_app, name="contract")
app.add_typer(projections_app, name="projections")
app.add_typer(streams_app, name="streams")
app.add_typer(nats_app, name="nats")
app.add_typer(inference_app, name="inference")
app.add_typer(audit_app, name="audit")
register_audit_history(audit_app)  # audit replay, audit rerun
register_privacy(app)  # erase, retention set/purge


def _settings() -> Settings:
    try:
        return Settings()
    except ValueError as error:
        console.print(f"[red]invalid settings:[/red] {error}")
        raise typer.Exit(2) from None


@contextlib.contextmanager
def _usage_errors(*errors: type[Exception]) -> Iterator[None]:
    """Any of `errors` raised in the block is a usage error: its message in red, exit status 2."""
    try:
        yield
    except errors as error:
        console.print(f"[red]{escape(str(error))}[/red]")
        raise typer.Exit(2) from None


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option(envvar="TF_LOG_LEVEL", help="Log level.")] = "INFO",
) -> None:
    logs.configure(log_level.upper())


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _stop_signal_arrived(timeout: float) -> bool:
    received = signal.sigtimedwait(STOP_SIGNALS, timeout)
    if received is None:
        return False
    sender = f"pid {received.si_pid}"
    with contextlib.suppress(OSError):
        arguments = Path(f"/proc/{received.si_pid}/cmdline").read_bytes().split(b"\0")
        sender += f" ({b' '.join(arguments).decode(errors='replace').strip()[:200]})"
    logger.info("received %s from %s", signal.Signals(received.si_signo).name, sender)
    return True


@app.command()
def up(
    data_dir: Annotated[
        Path | None, typer.Option(help="Where the embedded servers keep their data.")
    ] = None,
    nats_cluster: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=5,
            help="Embedded NATS servers: 3 runs a local JetStream cluster (TF_NATS_CLUSTER_SIZE).",
        ),
    ] = None,
    scale: Annotated[
        str,
        typer.Option(
            help="Copies per process, e.g. inference=2,ingest=2,relay=2 (the APIs' copies "
            "share their port)."
        ),
    ] = "",
) -> None:
    """Start the whole stack: embedded servers, migrations, the command API and the relay."""
    from ticketflow.embedded import StackAlreadyRunning
    from ticketflow.portability import VectorCheckFailed
    from ticketflow.postgres import PostgresError
    from ticketflow.stack import PortInUse, Stack, parse_scale

    settings = _settings()
    if data_dir is not None:
        settings = settings.model_copy(update={"data_dir": data_dir})
    if nats_cluster is not None:
        update: dict[str, object] = {"nats_cluster_size": nats_cluster}
        if "stream_replicas" not in settings.model_fields_set:
            update["stream_replicas"] = min(3, nats_cluster)
        settings = settings.model_copy(update=update)
    with _usage_errors(ValueError):
        copies = parse_scale(scale)
    stop = threading.Event()
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: stop.set())

    stack = Stack(settings, scale=copies)
    try:
        info = stack.start()
    except StackAlreadyRunning as error:
        console.print(f"[yellow]{error}[/yellow]; stop it first or use another --data-dir")
        raise typer.Exit(1) from None
    except (PortInUse, PostgresError, VectorCheckFailed) as error:
        console.print(f"[red]{escape(str(error))}[/red]")
        raise typer.Exit(1) from None
    try:
        console.print("[green]ticketflow is up[/green]")
        for name, url in (("command API", info.commands_url), ("query API  ", info.queries_url)):
            docs = f"  (docs: {url}/docs)" if settings.serves_api_docs else ""
            console.print(f"  {name}  {url}{docs}")
        console.print(f"  NATS         {info.nats_url}  (stream {settings.stream_name})")
        if info.nats_credentials:
            console.print(f"  NATS creds   {info.nats_credentials}", soft_wrap=True)
        console.print(f"  Redis        {info.redis_url}")
        console.print(f"  PostgreSQL   {info.database_url}", soft_wrap=True)
        console.print(f"  data         {stack.data_dir}   logs: {stack.logs_dir}", soft_wrap=True)
        console.print("Press Ctrl-C to stop.")
        # From here on the stop signals are collected, not handled, so the log can say who
        # sent them; children unblock them again before they start (see embedded.spawn).
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        stack.run_until(lambda: stop.is_set() or _stop_signal_arrived(0.5))
        console.print("stopping…")
    finally:
        stack.stop()
    console.print("stopped")


OptionPairs = Annotated[
    list[str] | None,
    typer.Option(
        metavar="KEY=VALUE",
        help="A pipeline option (e.g. count=5); JSON values are read as JSON. Repeatable.",
    ),
]
OptionsJson = Annotated[
    str | None, typer.Option(metavar="JSON", help="The pipeline options as a JSON object.")
]


@app.command()
def run(
    document: Annotated[
        Path | None,
        typer.Argument(help="A PDF or DOCX file (role main).", exists=True, dir_okay=False),
    ] = None,
    pipeline: Annotated[str, typer.Option(help="Pipeline to run.")] = "document-review",
    tenant: Annotated[str, typer.Option(help="Tenant to submit as.")] = "local",
    user: Annotated[str, typer.Option(help="User to submit as.")] = "local-user",
    with_roles: Annotated[
        list[str] | None,
        typer.Option(
            "--document",
            metavar="ROLE=PATH",
            help="A document with its role (e.g. resume=cv.docx); repeat for several.",
        ),
    ] = None,
    option: OptionPairs = None,
    options: OptionsJson = None,
) -> None:
    """Run documents through a pipeline and print its report (starts a stack if needed)."""
    from ticketflow.bootstrap import extraction_limits, extraction_pool, jwt_codec
    from ticketflow.embedded import StackAlreadyRunning, running_stack
    from ticketflow.portability import VectorCheckFailed
    from ticketflow.postgres import PostgresError
    from ticketflow.run import (
        RunFailed,
        check_documents,
        parse_documents,
        parse_options,
        print_report,
        submit_and_follow,
        wait_until_healthy,
    )
    from ticketflow.stack import PortInUse, Stack

    settings = _settings()
    with _usage_errors(RunFailed, ValueError):
        documents = parse_documents(document, with_roles or [])
        ticket_options = parse_options(options, option or [])
        token = jwt_codec(settings).mint(subject=user, tenant=tenant, roles=["user"])
    try:
        check_documents(documents, extraction_pool(settings, 1), extraction_limits(settings))
    except RunFailed as error:
        console.print(f"[red]failed:[/red] {escape(str(error))}")
        raise typer.Exit(1) from None
    out = Console()
    info = running_stack(settings.data_dir)
    stack: Stack | None = None
    if info is None:
        console.print("starting ticketflow (embedded servers, APIs and workers)…")
        stack = Stack(settings)
        try:
            info = stack.start()
        except (StackAlreadyRunning, PortInUse, PostgresError, VectorCheckFailed) as error:
            console.print(f"[red]{escape(str(error))}[/red]")
            raise typer.Exit(1) from None
    try:
        wait_until_healthy([info.commands_url, info.queries_url])
        report = submit_and_follow(
            console,
            commands_url=info.commands_url,
            queries_url=info.queries_url,
            token=token,
            pipeline=pipeline,
            documents=documents,
            options=ticket_options,
        )
    except RunFailed as error:
        console.print(f"[red]failed:[/red] {escape(str(error))}")
        raise typer.Exit(1) from None
    finally:
        if stack is not None:
            stack.stop()
    print_report(out, report)


TenantOption = Annotated[str, typer.Option(help="Tenant to act as.")]
UserOption = Annotated[str, typer.Option(help="User to act as.")]


def _client_of_running_stack(tenant: str, user: str) -> tuple[StackInfo, dict[str, str]]:
    """The running stack's addresses and an authorisation header, or a clear exit."""
    from ticketflow.bootstrap import jwt_codec
    from ticketflow.embedded import running_stack

    settings = _settings()
    with _usage_errors(ValueError):
        token = jwt_codec(settings).mint(subject=user, tenant=tenant, roles=["user"])
    info = running_stack(settings.data_dir)
    if info is None:
        console.print(f"no stack is running on {settings.data_dir}; start one with `ticketflow up`")
        raise typer.Exit(1)
    return info, {"Authorization": f"Bearer {token}"}


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        from ticketflow.run import error_message

        console.print(f"[red]{response.status_code}[/red] {error_message(response)}")
        raise typer.Exit(1)
    return response


@app.command()
def submit(
    document: Annotated[
        Path, typer.Argument(help="A PDF or DOCX file.", exists=True, dir_okay=False)
    ],
    pipeline: Annotated[str, typer.Option(help="Pipeline to run.")] = "document-review",
    tenant: TenantOption = "local",
    user: UserOption = "local-user",
    option: OptionPairs = None,
    options: OptionsJson = None,
) -> None:
    """Submit a document to the running stack and print the ticket id."""
    from ticketflow.run import RunFailed, parse_options

    with _usage_errors(RunFailed):
        ticket_options = parse_options(options, option or [])
    info, headers = _client_of_running_stack(tenant, user)
    data = {"pipeline": pipeline}
    if ticket_options:
        data["options"] = json.dumps(ticket_options)
    with document.open("rb") as handle:
        response = _checked(
            httpx.post(
                f"{info.commands_url}/tickets",
                headers=headers,
                files={"file": (document.name, handle)},
                data=data,
                timeout=60,
            )
        )
    typer.echo(json.dumps(response.json()))


@app.command()
def status(
    ticket_id: Annotated[str, typer.Argument(help="The ticket id.")],
    tenant: TenantOption = "local",
    user: UserOption = "local-user",
) -> None:
    """Show a ticket's status and its subtasks."""
    from rich.table import Table

    info, headers = _client_of_running_stack(tenant, user)
    ticket = _checked(
        httpx.get(f"{info.queries_url}/tickets/{ticket_id}", headers=headers, timeout=30)
    ).json()
    table = Table(title=f"{ticket['pipeline_name']} — {ticket['status']}")
    for column in ("subtask", "status", "attempts", "latency ms"):
        table.add_column(column)
    for subtask in ticket["subtasks"]:
        latency = subtask.get("latency_ms")
        table.add_row(
            subtask["title"],
            subtask["status"],
            str(subtask["attempts"]),
            f"{latency:.0f}" if latency is not None else "",
        )
    Console().print(table)
    if ticket.get("failure_reason"):
        Console().print(f"[red]failed:[/red] {ticket['failure_reason']}")


@app.command()
def report(
    ticket_id: Annotated[str, typer.Argument(help="The ticket id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, not Markdown.")] = False,
    tenant: TenantOption = "local",
    user: UserOption = "local-user",
) -> None:
    """Print a completed ticket's report."""
    info, headers = _client_of_running_stack(tenant, user)
    accept = "application/json" if as_json else "text/markdown"
    response = _checked(
        httpx.get(
            f"{info.queries_url}/tickets/{ticket_id}/report",
            headers={**headers, "Accept": accept},
            timeout=30,
        )
    )
    if as_json:
        typer.echo(json.dumps(response.json(), indent=2, ensure_ascii=False))
    else:
        from ticketflow.run import print_report

        print_report(Console(), response.text)


@app.command()
def doctor() -> None:
    """Check this machine and the stack: CPU, ports, disk, memory, servers, model; exit 1 on a
    failed check."""
    from ticketflow.doctor import run_checks, table

    settings = _settings()
    with console.status("checking…"):
        checks = run_checks(settings)
    Console(width=max(120, Console().width)).print(table(checks))
    if any(check.verdict == "fail" for check in checks):
        raise typer.Exit(1)


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

    with _usage_errors(ValueError):
        minted = jwt_codec(_settings()).mint(
            subject=user, tenant=tenant, roles=role or ["user"], ttl_s=ttl
        )
    typer.echo(minted)


@app.command("create-admin")
def create_admin(
    tenant: Annotated[str, typer.Option(help="New tenant's slug, e.g. acme.")],
    email: Annotated[str, typer.Option(help="The admin's e-mail address.")],
    password: Annotated[
        str,
        typer.Option(
            prompt=True,
            hide_input=True,
            confirmation_prompt=True,
            envvar="TF_ADMIN_PASSWORD",
            help="Asked for when not given (or TF_ADMIN_PASSWORD).",
        ),
    ],
) -> None:
    """Open a tenant with its first admin (the way in when TF_TENANT_REGISTRATION=closed)."""
    from commands.errors import DomainError
    from identity.accounts import RegisterUser
    from ticketflow.bootstrap import account_service, server_urls

    settings = _settings()
    service = account_service(
        settings.model_copy(update={"tenant_registration": "open"}),
        server_urls(settings).database_url,
    )
    try:
        # The operator may open a tenant that already holds tickets (from tokens of an identity
        # provider, say), which anonymous registration refuses.
        result = service.register(RegisterUser(tenant, email, password), adopt=True)
    except DomainError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    finally:
        service.close()
    console.print(f"tenant {tenant} opened; its admin is {result.account.email}")
    typer.echo(str(result.account.user_id))


@serve_app.command("commands")
def serve_commands(
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    reuse_port: Annotated[bool, typer.Option(help=REUSE_PORT_HELP)] = False,
) -> None:
    """The command HTTP API."""
    from ticketflow.bootstrap import commands_api

    settings = _settings()
    _serve(
        commands_api(settings),
        settings,
        host or settings.host,
        port or settings.commands_port,
        reuse_port=reuse_port,
    )


@serve_app.command("queries")
def serve_queries(
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    reuse_port: Annotated[bool, typer.Option(help=REUSE_PORT_HELP)] = False,
) -> None:
    """The query HTTP API: tickets, reports, event history, live progress (SSE) and search."""
    from ticketflow.bootstrap import queries_api

    settings = _settings()
    _serve(
        queries_api(settings),
        settings,
        host or settings.host,
        port or settings.queries_port,
        reuse_port=reuse_port,
    )


REUSE_PORT_HELP = "Bind with SO_REUSEPORT, so that several copies share the port."


def _serve(app: Any, settings: Settings, host: str, port: int, *, reuse_port: bool) -> None:
    import socket

    import uvicorn

    options: dict[str, Any] = {
        "log_config": None,
        "timeout_graceful_shutdown": 10,
        **uvicorn_proxy_options(settings),
    }
    if not reuse_port:
        uvicorn.run(app, host=host, port=port, **options)
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.set_inheritable(True)
        uvicorn.run(app, fd=sock.fileno(), **options)


def uvicorn_proxy_options(settings: Settings) -> dict[str, Any]:
    """Proxy headers (X-Forwarded-For, X-Forwarded-Proto) are believed only from the addresses in
    TF_TRUSTED_PROXIES. Left to itself uvicorn believes them from 127.0.0.1, so any local
    process could pick the client address that per-IP rate limits count."""
    trusted = settings.trusted_proxy_list
    return {"proxy_headers": bool(trusted), "forwarded_allow_ips": trusted or None}


def _run_until_signalled(main: object) -> None:
    """Runs a long-lived service on uvloop, the event loop the APIs run on under uvicorn.

    The heap built by the imports is frozen out of the cyclic collector's reach first, as the
    APIs freeze theirs at start-up (`security.http.api_lifespan`): full collections then walk
    only what the service allocated since."""
    import gc

    import uvloop

    gc.freeze()

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)  # type: ignore[operator]

    uvloop.run(runner())


@worker_app.command("relay")
def worker_relay() -> None:
    """Publish every recorded event to JetStream, in order."""
    from ticketflow.bootstrap import run_relay

    settings = _settings()
    _run_until_signalled(lambda stop: run_relay(settings, stop))


@worker_app.command("ingest")
def worker_ingest() -> None:
    """Extract, chunk and embed the documents of new tickets."""
    from ticketflow.bootstrap import run_ingest_worker

    settings = _settings()
    _run_until_signalled(lambda stop: run_ingest_worker(settings, stop))


@worker_app.command("inference")
def worker_inference() -> None:
    """Run ready subtasks on the inference backend."""
    from ticketflow.bootstrap import run_inference_worker

    settings = _settings()
    _run_until_signalled(lambda stop: run_inference_worker(settings, stop))


@worker_app.command("projector")
def worker_projector() -> None:
    """Fold the event log into the read models the query API serves."""
    from ticketflow.bootstrap import run_projector

    settings = _settings()
    _run_until_signalled(lambda stop: run_projector(settings, stop))


@projections_app.command("rebuild")
def projections_rebuild() -> None:
    """Replay the whole event log into new read models, then swap them in atomically."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from projections import RebuildInProgress
    from ticketflow.bootstrap import rebuild_projections

    settings = _settings()
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("replaying events", total=None)

        def advance(position: int, max_position: int) -> None:
            progress.update(task, completed=position, total=max_position)

        try:
            result = asyncio.run(rebuild_projections(settings, advance))
        except RebuildInProgress as error:
            console.print(f"[yellow]{error}[/yellow]")
            raise typer.Exit(1) from None
    console.print(
        f"[green]read models rebuilt[/green]: {result.events} events up to position "
        f"{result.position} in {result.seconds:.1f} s"
    )


@projections_app.command("status")
def projections_status() -> None:
    """Each projection's position, the event log's newest position and the lag."""
    from rich.table import Table

    from ticketflow.bootstrap import projection_status

    statuses = asyncio.run(projection_status(_settings()))
    table = Table("projection", "position", "log position", "lag", "updated", "rebuilt")
    for entry in statuses:
        table.add_row(
            entry.name,
            str(entry.position),
            str(entry.max_position),
            f"[green]{entry.lag}[/green]" if entry.lag == 0 else f"[yellow]{entry.lag}[/yellow]",
            f"{entry.updated_at:%Y-%m-%d %H:%M:%S}" if entry.updated_at else "never",
            f"{entry.rebuilt_at:%Y-%m-%d %H:%M:%S}" if entry.rebuilt_at else "never",
        )
    Console().print(table)


@streams_app.command("verify")
def streams_verify(
    repair: Annotated[
        bool, typer.Option(help="Publish again, from the event store, what the stream lacks.")
    ] = False,
    since: Annotated[int, typer.Option(min=1, help="Check events from this position on.")] = 1,
) -> None:
    """Every event of the store in the stream once, in order, with the same body; exit 1 if not.

    Checks the events up to the relay's checkpoint; reports missing, duplicated, out-of-order
    and different messages. `--repair` republishes the missing ones and checks again."""
    from ticketflow.streams_verify import verify_stream

    settings = _settings()
    report, repaired = asyncio.run(verify_stream(settings, repair=repair, since=since))
    if repaired is not None:
        console.print(f"republished {repaired} missing events; checking again")
    console.print(escape(report.summary()))
    if not report.ok:
        raise typer.Exit(1)


@inference_app.command(
    "serve-sglang",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def inference_serve_sglang(
    ctx: typer.Context,
    model_path: Annotated[
        str | None,
        typer.Option(help="Model directory or Hugging Face id (default: TF_SGLANG_MODEL)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 30000,
    tp: Annotated[int, typer.Option(help="Tensor-parallel size (GPUs per model copy).")] = 1,
    mem_fraction_static: Annotated[
        float | None, typer.Option(help="GPU memory share for weights and KV cache.")
    ] = None,
) -> None:
    """Start an SGLang server with ticketflow's recommended flags; other flags pass through."""
    from ticketflow.sglang_server import SGLangMissing, SGLangServerOptions, exec_sglang

    settings = _settings()
    with _usage_errors(ValueError):
        options = SGLangServerOptions(
            model_path=model_path or settings.sglang_model or "",
            host=host,
            port=port,
            tp=tp,
            mem_fraction_static=mem_fraction_static,
            extra_args=tuple(ctx.args),
        )
    try:
        exec_sglang(options)
    except SGLangMissing as error:
        # Escaped: the install hint's "[gpu]" would otherwise read as markup.
        console.print(f"[red]{escape(str(error))}[/red]")
        raise typer.Exit(1) from None


@nats_app.command("credentials")
def nats_credentials(
    tenant: Annotated[str, typer.Option(help="Tenant whose events they may read, e.g. acme.")],
    name: Annotated[
        str, typer.Option(help="Who they are for; shown in the NATS server's logs.")
    ] = "integrator",
    ttl: Annotated[
        str | None,
        typer.Option(help="Lifetime: 30d, 12h, 15m, 90s (default TF_NATS_INTEGRATOR_TTL_S)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Write the .creds file here (mode 0600), not to stdout.")
    ] = None,
) -> None:
    """Mint NATS credentials that may subscribe to `tf.evt.<tenant>.>` and nothing else."""
    from datetime import timedelta

    from ticketflow.bootstrap import integrator_signer
    from ticketflow.nats_auth import parse_ttl, write_private

    settings = _settings()
    try:
        lifetime = parse_ttl(ttl) if ttl else timedelta(seconds=settings.nats_integrator_ttl_s)
        signer = integrator_signer(settings)
        credentials = signer.credentials(tenant, name, lifetime)
    except (LookupError, OSError) as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    except ValueError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    if output is None:
        typer.echo(credentials, nl=False)
        return
    write_private(output, credentials)
    console.print(f"wrote {output}; subscribe with: nats --creds {output} sub 'tf.evt.{tenant}.>'")


@contract_app.command("schemas")
def contract_schemas() -> None:
    """Print the JSON Schema of every event payload, keyed by topic."""
    from streams.contract import json_schemas

    json.dump(json_schemas(), sys.stdout, indent=2)
    sys.stdout.write("\n")


@contract_app.command("asyncapi")
def contract_asyncapi(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file, not stdout.")
    ] = None,
) -> None:
    """Print the AsyncAPI 3.0 document of the event stream (subjects, headers, payloads)."""
    from streams.contract.asyncapi import asyncapi_json

    text = asyncapi_json()
    if output is None:
        sys.stdout.write(text)
        return
    output.write_text(text, encoding="utf-8")
    console.print(f"wrote {output}")


def _read_asyncapi(path: Path) -> dict[str, object]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        console.print(f"[red]cannot read {path}: {error}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None
    if not isinstance(document, dict) or not str(document.get("asyncapi", "")).startswith("3."):
        console.print(f"[red]{path} is not an AsyncAPI 3 document[/red]", soft_wrap=True)
        raise typer.Exit(2)
    return document


@contract_app.command("check")
def contract_check(
    old: Annotated[Path, typer.Argument(help="The AsyncAPI document of an earlier release.")],
    new: Annotated[
        Path | None,
        typer.Option(help="Compare this document instead of today's contract."),
    ] = None,
) -> None:
    """Fail (exit 1) when the contract breaks consumers of OLD; list every breaking change."""
    from streams.contract.asyncapi import asyncapi_document
    from streams.contract.compatibility import compare

    before = _read_asyncapi(old)
    after = _read_asyncapi(new) if new is not None else asyncapi_document()
    try:
        report = compare(before, after)
    except ValueError as error:
        console.print(f"[red]cannot compare: {error}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None
    for addition in report.additions:
        typer.echo(f"added: {addition}")
    for problem in report.breaking:
        typer.echo(f"breaking: {problem}")
    if report.breaking:
        console.print(
            f"[red]{len(report.breaking)} breaking change(s) against {old}[/red]; "
            "make an incompatible change a new topic version (docs/integrators.md)",
            soft_wrap=True,
        )
        raise typer.Exit(1)
    console.print(
        f"[green]compatible with {old}[/green] ({len(report.additions)} additions)", soft_wrap=True
    )


def main() -> None:
    app()
