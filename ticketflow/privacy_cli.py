"""`ticketflow erase` and `ticketflow retention`: erase a user's personal data, set how long a
tenant keeps its documents, and run the retention purge now (docs/adr/0021-crypto-shredding.md)."""

from __future__ import annotations

import asyncio
from typing import Annotated
from uuid import UUID

import typer
from rich.console import Console

from ticketflow.settings import Settings

console = Console(stderr=True)
retention_app = typer.Typer(
    no_args_is_help=True, help="How long tenants keep their documents, and the purge."
)
OPERATOR = "operator"
"""Who the events name as having acted, when an operator runs a command."""


def _settings() -> Settings:
    try:
        return Settings()
    except ValueError as error:
        console.print(f"[red]invalid settings:[/red] {error}")
        raise typer.Exit(2) from None


def erase(
    tenant: Annotated[str, typer.Option(help="The user's tenant.")],
    user: Annotated[str, typer.Option(help="The user's id.")],
    by: Annotated[str, typer.Option(help="Who asked for it, recorded in the event.")] = OPERATOR,
) -> None:
    """Erase a user's personal data: destroy their key (their e-mail address then reads
    [erased] everywhere), record user.erased, close the account and end their sessions."""
    from commands.errors import DomainError
    from identity.accounts import EraseUser
    from ticketflow.bootstrap import account_service, server_urls

    try:
        user_id = UUID(user)
    except ValueError:
        raise typer.BadParameter(
            f"{user!r} is not a user id (a UUID)", param_hint="--user"
        ) from None
    settings = _settings()
    urls = server_urls(settings)
    service = account_service(settings, urls.database_url)
    try:
        result = service.erase(EraseUser(tenant, user_id, by))
    except DomainError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    finally:
        service.close()
    revoked = asyncio.run(_revoke_sessions(settings, urls.redis_url, str(user_id)))
    if result.position is None:
        console.print(f"user {user_id} of {tenant} was already erased")
    else:
        console.print(
            f"user {user_id} of {tenant} erased at position {result.position}; "
            f"{revoked} sessions ended"
        )


async def _revoke_sessions(settings: Settings, redis_url: str, user_id: str) -> int:
    from security.availability import open_redis
    from ticketflow.bootstrap import session_store

    redis = open_redis(redis_url, timeout_s=settings.redis_timeout_s)
    try:
        return await session_store(settings, redis).revoke_user(user_id)
    except Exception as error:
        console.print(
            f"[yellow]could not end the user's sessions ({error}); they expire on their own, "
            "and the account can no longer log in or refresh[/yellow]",
            soft_wrap=True,
        )
        return 0
    finally:
        await redis.aclose()


@retention_app.command("set")
def set_retention(
    tenant: Annotated[str, typer.Option(help="Whose documents.")],
    days: Annotated[
        int | None,
        typer.Option(min=0, help="Keep documents this many days; leave out to keep them for ever."),
    ] = None,
    by: Annotated[str, typer.Option(help="Who asked for it, recorded in the event.")] = OPERATOR,
) -> None:
    """Set how many days TENANT keeps its documents and their extracted texts."""
    from commands.errors import DomainError
    from ticketflow.bootstrap import retention_service, server_urls

    settings = _settings()
    service = retention_service(settings, server_urls(settings).database_url)
    try:
        result = service.set_retention(tenant, days, by)
    except DomainError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    finally:
        service.close()
    kept = "for ever" if days is None else f"{days} days"
    changed = "unchanged" if result.position is None else f"position {result.position}"
    console.print(f"{tenant} keeps its documents {kept} ({changed})")


@retention_app.command("purge")
def purge() -> None:
    """Purge now what every tenant no longer keeps (the relay process does it periodically)."""
    from ticketflow.bootstrap import retention_service, server_urls

    settings = _settings()
    service = retention_service(settings, server_urls(settings).database_url)
    try:
        total = 0
        while purged := service.purge_expired():
            total += len(purged)
            for item in purged:
                typer.echo(f"{item.tenant} {item.sha256} {item.media_type} purged")
            if len(purged) < 200:
                break
    finally:
        service.close()
    console.print(f"{total} blobs purged")


def register(app: typer.Typer) -> None:
    app.command("erase")(erase)
    app.add_typer(retention_app, name="retention")
