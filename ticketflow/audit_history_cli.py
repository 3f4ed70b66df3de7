"""`ticketflow audit replay` and `ticketflow audit rerun`: the read models as they stood at a past
point (in a scratch schema, optionally diffed against another point), and a ticket run again on
the same documents, linked to the first (docs/adr/0019-time-travel-provenance-rerun.md).

`register` adds both commands to the `audit` group of the CLI.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console

from ticketflow.settings import Settings

out = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    try:
        return Settings()
    except ValueError as error:
        err.print(f"[red]invalid settings:[/red] {error}")
        raise typer.Exit(2) from None


def _database_url(settings: Settings) -> str:
    from ticketflow.bootstrap import server_urls

    try:
        return server_urls(settings).database_url
    except (RuntimeError, ValueError) as error:
        err.print(f"[red]{error}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None


def _point(name: str, value: str) -> int | datetime:
    from read_api.explain import InvalidAsOf, parse_as_of

    try:
        return parse_as_of(value)
    except InvalidAsOf as error:
        raise typer.BadParameter(str(error), param_hint=name) from None


def _show(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


async def _resolve(conn: Any, point: int | datetime, name: str) -> int:
    from streams.contract import history

    end = await history.last_position(conn)
    if isinstance(point, datetime):
        return await history.position_at(conn, point)
    if point > end:
        raise typer.BadParameter(
            f"position {point} is after the last recorded event ({end})", param_hint=name
        )
    return point


async def replay(
    database_url: str,
    tenant: str,
    until: int | datetime,
    against: int | datetime | None,
    keep: bool,
) -> int:
    import asyncpg

    from projections.history import diff_schemas, drop_schema, replay_into_schema, table_rows
    from projections.writer import READ_MODEL_TABLES

    conn = await asyncpg.connect(
        database_url, server_settings={"application_name": "ticketflow-audit"}
    )
    schemas: list[str] = []
    try:
        position = await _resolve(conn, until, "--until")
        built = await replay_into_schema(conn, tenant, position)
        schemas.append(built.schema)
        out.print(
            f"[bold]{tenant}[/bold] as of position {position}: {built.events} events replayed"
            f" into schema [cyan]{built.schema}[/cyan]"
        )
        for table in READ_MODEL_TABLES:
            rows = await table_rows(conn, built.schema, table)
            out.print(f"  {table}: {len(rows)} rows")
        if against is not None:
            other_position = await _resolve(conn, against, "--diff-against")
            other = await replay_into_schema(conn, tenant, other_position)
            schemas.append(other.schema)
            out.print(
                f"diff from position {other_position} ([cyan]{other.schema}[/cyan]) to"
                f" position {position}:"
            )
            from projections.history import TABLE_KEYS

            for diff in await diff_schemas(conn, other.schema, built.schema):
                keys = TABLE_KEYS[diff.table]
                out.print(
                    f"[bold]{diff.table}[/bold]: {len(diff.added)} added, {len(diff.removed)}"
                    f" removed, {len(diff.changed)} changed"
                )

                def key(row: dict[str, Any], keys: tuple[str, ...] = keys) -> str:
                    return " ".join(_show(row[k]) for k in keys)

                for row in diff.added:
                    out.print(f"  + {key(row)}", markup=False)
                for row in diff.removed:
                    out.print(f"  - {key(row)}", markup=False)
                for before, after in diff.changed:
                    out.print(f"  ~ {key(after)}", markup=False)
                    for column in after:
                        if before.get(column) != after[column]:
                            out.print(
                                f"      {column}: {_show(before.get(column))} ->"
                                f" {_show(after[column])}",
                                markup=False,
                            )
        if keep:
            out.print(f"kept: {', '.join(schemas)} (drop with DROP SCHEMA … CASCADE)")
        return position
    finally:
        if not keep:
            for schema in schemas:
                await drop_schema(conn, schema)
        await conn.close()


def register(audit_app: typer.Typer) -> None:
    """Adds `replay` and `rerun` to the `audit` command group."""

    @audit_app.command("replay")
    def replay_command(
        tenant: Annotated[str, typer.Option(help="Whose read models.")],
        until: Annotated[
            str, typer.Option(help="A global position, or an RFC 3339 time with its zone.")
        ],
        diff_against: Annotated[
            str | None,
            typer.Option(help="Another position or time: print the rows added, removed, changed."),
        ] = None,
        keep: Annotated[
            bool, typer.Option("--keep", help="Keep the scratch schemas (else dropped).")
        ] = False,
    ) -> None:
        """Rebuild a tenant's read models as they stood at a past point, in a scratch schema.

        The projector's own code replays the tenant's events up to --until; with
        --diff-against, the rows added, removed and changed since that other point are printed.
        """
        settings = _settings()
        point = _point("--until", until)
        against = _point("--diff-against", diff_against) if diff_against else None
        asyncio.run(replay(_database_url(settings), tenant, point, against, keep))

    @audit_app.command("rerun")
    def rerun_command(
        ticket: Annotated[uuid.UUID, typer.Argument(help="The ticket to run again.")],
        tenant: Annotated[str, typer.Option(help="The ticket's tenant.")],
        pipeline_version: Annotated[
            int | None,
            typer.Option(help="The pipeline version to run: the ticket's own, or today's."),
        ] = None,
        requested_by: Annotated[str, typer.Option("--by", help="Who asks, as recorded.")] = (
            "auditor"
        ),
    ) -> None:
        """Run a ticket again: a new ticket on its documents, linked to it.

        The link is a TicketRerunRequested event on the new ticket, which runs today's pipeline
        (or --pipeline-version). Compare the reports with GET /tickets/TICKET/diff/NEW.
        """
        from commands.errors import TicketNotFound, UnknownPipeline
        from commands.messages import RerunTicket
        from ticketflow.bootstrap import command_service

        settings = _settings()
        service = command_service(settings, _database_url(settings))
        try:
            result = service.rerun_ticket(
                RerunTicket(ticket, tenant, requested_by, pipeline_version=pipeline_version)
            )
        except (TicketNotFound, UnknownPipeline) as error:
            err.print(f"[red]{error}[/red]", soft_wrap=True)
            raise typer.Exit(1) from None
        finally:
            service.close()
        out.print(f"{result.ticket_id}")
        err.print(
            f"re-run of {ticket} opened as {result.ticket_id} (position {result.position}); "
            f"compare: GET /tickets/{ticket}/diff/{result.ticket_id}",
            soft_wrap=True,
        )
