"""`ticketflow audit`: export a tenant's tamper-evident history as a bundle, and verify a bundle
(no database needed) or the stored chain in place (docs/adr/0020-audit-chain.md)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from streams.contract.audit import PublicKey
from streams.contract.audit_bundle import BundleError, VerifyReport, verify_bundle
from ticketflow.settings import Settings

console = Console(stderr=True)
audit_app = typer.Typer(
    no_args_is_help=True, help="The tamper-evident event history: export and verify."
)


def _settings() -> Settings:
    try:
        return Settings()
    except ValueError as error:
        console.print(f"[red]invalid settings:[/red] {error}")
        raise typer.Exit(2) from None


def _database_url(settings: Settings) -> str:
    from ticketflow.embedded import running_stack

    if settings.database_url:
        return settings.database_url
    stack = running_stack(settings.data_dir)
    if stack is None:
        console.print(
            f"[red]TF_DATABASE_URL is not set and no stack runs in {settings.data_dir}[/red]; "
            "start one with `ticketflow up` or set the URL",
            soft_wrap=True,
        )
        raise typer.Exit(2)
    return stack.database_url


def _bound(name: str, value: str | None) -> object:
    from read_api.audit_export import Bound

    if value is None:
        return None
    try:
        return Bound.parse(value)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint=name) from None


@audit_app.command("export")
def export(
    out: Annotated[
        Path, typer.Argument(help="A new directory, or a file ending in .tar.gz / .tgz.")
    ],
    tenant: Annotated[str, typer.Option(help="Whose history.")],
    since: Annotated[
        str | None, typer.Option(help="First position, or an RFC 3339 time (recorded_at).")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Last position, or an RFC 3339 time (recorded_at).")
    ] = None,
    with_blobs: Annotated[
        bool, typer.Option("--with-blobs", help="Include the referenced documents' contents.")
    ] = False,
) -> None:
    """Write TENANT's events, signed checkpoints, public keys and blob manifest to OUT."""
    import asyncpg

    from read_api.audit_export import Bound, check_range, export_bundle

    start, end = _bound("--since", since), _bound("--until", until)
    assert start is None or isinstance(start, Bound)
    assert end is None or isinstance(end, Bound)
    try:
        check_range(start, end)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--since") from None
    if out.exists():
        console.print(f"[red]{out} exists[/red]")
        raise typer.Exit(2)
    url = _database_url(_settings())

    async def main() -> dict[str, object]:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            return await export_bundle(
                pool, tenant, out, since=start, until=end, with_blobs=with_blobs
            )
        finally:
            await pool.close()

    started = time.perf_counter()
    manifest = asyncio.run(main())
    console.print(
        f"[green]wrote {out}[/green]: {export_summary(manifest)} "
        f"in {time.perf_counter() - started:.1f} s",
        soft_wrap=True,
    )


def export_summary(manifest: Mapping[str, object]) -> str:
    """What an export holds, in words: its counts, and the positions its events span."""
    counts = manifest["counts"]
    assert isinstance(counts, Mapping)
    events = f"{counts['events']} events"
    if counts["events"]:
        events += f" (positions {manifest['first_position']}-{manifest['last_position']})"
    return f"{events}, {counts['checkpoints']} checkpoints, {counts['blobs']} blobs"


def _trusted_keys(paths: Sequence[Path]) -> list[PublicKey] | None:
    if not paths:
        return None
    keys = []
    for path in paths:
        try:
            keys.append(PublicKey.from_pem(path.read_bytes()))
        except (OSError, ValueError) as error:
            console.print(f"[red]cannot read the key {path}: {error}[/red]", soft_wrap=True)
            raise typer.Exit(2) from None
    return keys


def _print_report(report: VerifyReport, seconds: float) -> None:
    typer.echo(report.summary())
    rate = report.events / seconds if seconds > 0 else 0.0
    typer.echo(f"checked in {seconds:.2f} s ({rate:,.0f} events/s)")
    if report.ok:
        console.print("[green]verified: the chain is intact[/green]")
        return
    first = report.problems[0]
    console.print(f"[red]FIRST PROBLEM: {first}[/red]", soft_wrap=True)
    for problem in report.problems[1:20]:
        typer.echo(f"  also: {problem}")
    if len(report.problems) > 20:
        typer.echo(f"  … {len(report.problems) - 20} more")


@audit_app.command("verify")
def verify(
    bundle: Annotated[
        Path | None, typer.Argument(help="A bundle directory or archive (not with --live).")
    ] = None,
    live: Annotated[
        bool, typer.Option("--live", help="Check the stored chain in place (needs the database).")
    ] = False,
    tenant: Annotated[str | None, typer.Option(help="With --live: whose chain.")] = None,
    key: Annotated[
        list[Path] | None,
        typer.Option(
            "--key",
            help="A trusted public key (PEM, e.g. from GET /audit/keys); repeatable. Without "
            "one, checkpoints are checked against the keys the bundle carries.",
        ),
    ] = None,
) -> None:
    """Recompute every hash, check every link and checkpoint signature; exit 1 naming the first
    event altered, removed, inserted or reordered, or the first checkpoint that fails."""
    trusted = _trusted_keys(key or [])
    started = time.perf_counter()
    if live:
        if bundle is not None or not tenant:
            raise typer.BadParameter("--live takes --tenant and no BUNDLE")
        report = _verify_live(tenant, trusted)
        if report.ok and report.events == 0:
            # Most likely a misspelt tenant: an empty chain proves nothing, so it does not pass.
            console.print(
                f"[red]no events of tenant {tenant!r} are stored: nothing to verify[/red]"
            )
            raise typer.Exit(1)
    else:
        if bundle is None:
            raise typer.BadParameter("name a BUNDLE, or use --live --tenant T")
        try:
            report = verify_bundle(bundle, trusted)
        except (BundleError, OSError, ValueError) as error:
            console.print(f"[red]cannot read {bundle}: {error}[/red]", soft_wrap=True)
            raise typer.Exit(2) from None
    _print_report(report, time.perf_counter() - started)
    sys.stdout.flush()
    if not report.ok:
        raise typer.Exit(1)


def _verify_live(tenant: str, trusted: list[PublicKey] | None) -> VerifyReport:
    import asyncpg

    from read_api.audit_export import verify_live

    url = _database_url(_settings())

    async def main() -> VerifyReport:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            return await verify_live(pool, tenant, trusted)
        finally:
            await pool.close()

    return asyncio.run(main())
