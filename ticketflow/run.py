"""`ticketflow run`: submit a ticket's documents, watch its subtasks live, print the report.

It uses the stack running on the data directory, or starts one for the duration of the run.
Progress comes from the query API's Server-Sent Events; the report from the query API once the
read models have caught up with the ticket's last event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from handlers.extraction import ExtractionLimits
    from handlers.isolation import ExtractionPool

FINAL_EVENTS = {"completed", "failed", "cancelled"}
_STEPS = {"subtask_ready": 1, "subtask_started": 2, "subtask_completed": 3}


class RunFailed(Exception):
    """The ticket ended without a report; the message is the reason for the user."""


@dataclass(frozen=True)
class ServerEvent:
    position: int
    name: str
    data: dict[str, Any]


def server_events(response: httpx.Response) -> Iterator[ServerEvent]:
    """Parse a text/event-stream response into events (comments and retry lines skipped)."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if "data" in fields:
                position = int(fields.get("id", "0"))
                name = fields.get("event", "message")
                yield ServerEvent(position, name, json.loads(fields["data"]))
            fields = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        fields[name] = value[1:] if value.startswith(" ") else value


def wait_until_healthy(urls: list[str], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending:
        try:
            if httpx.get(f"{pending[0]}/health", timeout=2).status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RunFailed(f"{pending[0]} did not become healthy within {timeout:.0f}s")
        time.sleep(0.3)


MAIN_ROLE = "main"


def parse_documents(main: Path | None, with_roles: Sequence[str]) -> list[tuple[str, Path]]:
    """The documents to upload: `main` (role main) and each `ROLE=PATH` of `with_roles`."""
    documents: list[tuple[str, Path]] = [(MAIN_ROLE, main)] if main is not None else []
    for value in with_roles:
        role, separator, path = value.partition("=")
        if not separator or not role.strip() or not path.strip():
            raise RunFailed(f"--document {value!r}: write it as ROLE=PATH, e.g. resume=cv.docx")
        document = Path(path.strip()).expanduser()
        if not document.is_file():
            raise RunFailed(f"--document {value!r}: {document} is not a file")
        documents.append((role.strip(), document))
    if not documents:
        raise RunFailed("give a document, or --document ROLE=PATH for each of several")
    roles = [role for role, _ in documents]
    if len(set(roles)) != len(roles):
        raise RunFailed(f"each role may be given once; got {', '.join(roles)}")
    return documents


def check_documents(
    documents: Sequence[tuple[str, Path]], pool: ExtractionPool, limits: ExtractionLimits
) -> None:
    """Read each document as the stack's ingest worker will (the same checks, in the same kind
    of isolated process), so that a file the stack would refuse is refused at once, with the
    reason the failed ticket would give, instead of after a stack has started for it. An
    extraction that errs for another reason is left for the stack, which retries it."""
    from commands.errors import InvalidDocument
    from commands.uploads import sniff_media_type
    from handlers.extraction import ExtractionError

    async def check() -> None:
        # One event loop for every document: the pool's semaphore belongs to one loop.
        for _, path in documents:
            content = path.read_bytes()
            try:
                media_type = sniff_media_type(content)
                await pool.extract(content, media_type, limits)
            except (InvalidDocument, ExtractionError) as refused:
                raise RunFailed(f"{path.name}: {refused}") from None
            except RuntimeError:
                continue  # the extraction process died: left to the stack, which retries

    asyncio.run(check())


def parse_options(options_json: str | None, pairs: Sequence[str]) -> dict[str, Any]:
    """The ticket's options: the `--options` JSON object, then each `KEY=VALUE` over it.

    A value is read as JSON when it is JSON (`count=5` is a number, `strict=true` a boolean),
    and as a string otherwise (`difficulty=easy`); quote it to keep a string (`code='"007"'`).
    """
    options: dict[str, Any] = {}
    if options_json is not None:
        try:
            parsed = json.loads(options_json)
        except json.JSONDecodeError as error:
            raise RunFailed(f"--options is not valid JSON: {error}") from None
        if not isinstance(parsed, dict):
            raise RunFailed("--options must be a JSON object")
        options.update(parsed)
    for pair in pairs:
        key, separator, raw = pair.partition("=")
        if not separator or not key.strip():
            raise RunFailed(f"--option {pair!r}: write it as KEY=VALUE, e.g. count=5")
        value: Any = raw
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(raw)
        options[key.strip()] = value
    return options


def upload_fields(
    handles: Sequence[tuple[str, str, Any]], pipeline: str, options: Mapping[str, Any]
) -> tuple[list[tuple[str, tuple[str, Any]]], dict[str, Any]]:
    """The multipart files and form fields of `POST /tickets` for (role, filename, file)s."""
    data: dict[str, Any] = {"pipeline": pipeline}
    if options:
        data["options"] = json.dumps(dict(options), ensure_ascii=False)
    if len(handles) == 1 and handles[0][0] == MAIN_ROLE:
        _, name, handle = handles[0]
        return [("file", (name, handle))], data
    data["roles"] = [role for role, _, _ in handles]
    return [("files", (name, handle)) for _, name, handle in handles], data


def submit_and_follow(
    console: Console,
    *,
    commands_url: str,
    queries_url: str,
    token: str,
    document: Path | None = None,
    pipeline: str,
    documents: Sequence[tuple[str, Path]] = (),
    options: Mapping[str, Any] | None = None,
) -> str:
    """Submit the documents (`document` as role main, or `documents` with their roles) and
    `options`, show progress until the ticket ends, return its Markdown report."""
    headers = {"Authorization": f"Bearer {token}"}
    to_upload = [*([(MAIN_ROLE, document)] if document is not None else []), *documents]
    with contextlib.ExitStack() as stack:
        handles = [
            (role, path.name, stack.enter_context(path.open("rb"))) for role, path in to_upload
        ]
        files, data = upload_fields(handles, pipeline, options or {})
        response = httpx.post(
            f"{commands_url}/tickets", headers=headers, files=files, data=data, timeout=60
        )
    if response.status_code != 202:
        raise RunFailed(error_message(response))
    ticket_id = response.json()["ticket_id"]
    console.print(f"ticket [bold]{ticket_id}[/bold] accepted ({pipeline})")
    last = _follow(console, f"{queries_url}/tickets/{ticket_id}/stream", headers)
    if last.name != "completed":
        raise RunFailed(str(last.data.get("reason") or f"the ticket was {last.name}"))
    report = httpx.get(
        f"{queries_url}/tickets/{ticket_id}/report",
        headers={**headers, "Accept": "text/markdown"},
        params={"min_position": last.position},
        timeout=30,
    )
    if report.status_code != 200:
        raise RunFailed(error_message(report))
    return report.text


def _follow(console: Console, url: str, headers: dict[str, str]) -> ServerEvent:
    """Draw a bar per subtask from the ticket's live events; return its final event."""
    bars: dict[str, TaskID] = {}
    last_id = 0
    with Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        for _ in range(20):  # reconnects resume after the last event seen
            stream_headers = {**headers, "Last-Event-ID": str(last_id)} if last_id else headers
            try:
                # The server sends keep-alive comments while a subtask runs.
                timeout = httpx.Timeout(10.0, read=60.0)
                with httpx.stream("GET", url, headers=stream_headers, timeout=timeout) as response:
                    if response.status_code != 200:
                        response.read()
                        raise RunFailed(error_message(response))
                    for event in server_events(response):
                        last_id = event.position
                        _draw(progress, bars, event)
                        if event.name in FINAL_EVENTS:
                            return event
            except httpx.TransportError:
                time.sleep(1)
    raise RunFailed("lost the progress stream")


def _draw(progress: Progress, bars: dict[str, TaskID], event: ServerEvent) -> None:
    if event.name == "created":
        for subtask in event.data["pipeline"]["subtasks"]:
            bars[subtask["id"]] = progress.add_task(subtask["title"], total=3, state="waiting")
        bars["_ingest"] = progress.add_task("Reading the document", total=1, state="working")
    elif event.name == "document_ingested" and "_ingest" in bars:
        progress.update(bars["_ingest"], completed=1, state="done")
    elif event.name in _STEPS and event.data.get("subtask_id") in bars:
        state = {1: "queued", 2: "running", 3: "done"}[_STEPS[event.name]]
        progress.update(bars[event.data["subtask_id"]], completed=_STEPS[event.name], state=state)
    elif event.name == "subtask_failed" and event.data.get("subtask_id") in bars:
        retry = "retrying" if event.data.get("will_retry") else "failed"
        progress.update(bars[event.data["subtask_id"]], state=retry)
    elif event.name == "failed" and "_ingest" in bars and event.data.get("subtask_id") is None:
        progress.update(bars["_ingest"], state="failed")


def error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


def print_report(console: Console, markdown: str) -> None:
    console.print(Markdown(markdown))
