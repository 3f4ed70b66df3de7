"""Reports of completed tickets (JSON, Markdown or PDF, now or as of), a flashcards ticket's
cards as an Anki package, where each field came from, and two reports compared."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Header
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from read_api import anki, pdf, queries
from read_api.explain import Explanation, ReportDiff, ReportRef, diff_reports, explain
from read_api.routes.common import (
    AS_OF_ERRORS,
    MAX_POSITION,
    PROJECTION_HEADERS,
    SNAPSHOT_ERRORS,
    SNAPSHOT_READERS,
    TICKET_ERRORS,
    AsOf,
    Deps,
    MinPosition,
    QueryApiDeps,
    SnapshotReader,
    json_response,
    live_snapshot,
    not_found,
    projection_headers,
    resolve_as_of,
    ticket_history,
    ticket_snapshot,
    wait_for_projection,
)
from read_api.schemas import ReportBody
from security.http import ApiError, error_doc, forbidden_doc

router = APIRouter()


ReportFormat = Literal["json", "markdown", "pdf"]


def report_format(accept: str | None) -> ReportFormat:
    """What `Accept` asks for: JSON unless it ranks text/markdown or application/pdf at least as
    high as application/json (wildcards count for JSON only). Markdown and PDF with the same
    rank: the one named first. Nothing acceptable is JSON too: the route never answers 406."""
    if not accept:
        return "json"
    ranks: dict[str, tuple[float, int]] = {}
    for order, part in enumerate(accept.split(",")):
        media_type, *params = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        key = media_type.lower()
        best, first = ranks.get(key, (0.0, order))
        ranks[key] = (max(quality, best), min(first, order))
    json_rank = max(
        ranks.get("application/json", (0.0, 0))[0], ranks.get("application/*", (0.0, 0))[0]
    )
    offered: tuple[tuple[ReportFormat, str], ...] = (
        ("markdown", "text/markdown"),
        ("pdf", pdf.MEDIA_TYPE),
    )
    named = [
        (quality, -order, fmt)
        for fmt, media_type in offered
        for quality, order in [ranks.get(media_type, (0.0, 0))]
        if quality > 0 and quality >= json_rank
    ]
    if not named:
        return "json"
    return max(named)[2]


@router.get(
    "/tickets/{ticket_id}/report",
    response_model=ReportBody,
    responses={
        200: {
            "headers": PROJECTION_HEADERS,
            "content": {
                "text/markdown": {
                    "schema": {"type": "string"},
                    "example": "# document-review report\n\n## Verdict\n\naccept\n",
                },
                pdf.MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
            },
            "description": "JSON; Markdown with `Accept: text/markdown`; with"
            " `Accept: application/pdf`, that Markdown rendered as a PDF (A4, Unicode text).",
        },
        **TICKET_ERRORS,
        409: error_doc(
            "ticket_not_completed",
            "Ticket 6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f is running; its report exists"
            " once it completes.",
        ),
        **AS_OF_ERRORS,
        403: forbidden_doc(*SNAPSHOT_READERS),
    },
    summary="The report of a completed ticket (JSON, Markdown or PDF; now, or as of)",
    operation_id="getTicketReport",
    tags=["reports"],
)
async def get_report(
    ticket_id: UUID,
    principal: SnapshotReader,
    deps: Deps,
    min_position: MinPosition = None,
    accept: Annotated[str | None, Header(examples=["text/markdown", "application/pdf"])] = None,
    as_of: AsOf = None,
) -> Response:
    tenant = principal.tenant
    async with ticket_snapshot(
        deps, tenant, ticket_id, as_of=as_of, min_position=min_position
    ) as snapshot:
        conn, schema = snapshot.conn, snapshot.schema
        found = await queries.report(conn, tenant, ticket_id, schema=schema)
        ticket = None if found else await queries.ticket(conn, tenant, ticket_id, schema=schema)
    state = snapshot.state
    if found is None:
        if ticket is None:
            raise not_found(ticket_id)
        raise not_completed(ticket_id, ticket["status"], "report")
    # One URL, three formats: a cache must key the answer on the Accept header too.
    headers = projection_headers(state) | {"Vary": "Accept"}
    wanted = report_format(accept)
    if wanted == "markdown":
        return Response(
            found["markdown"], media_type="text/markdown; charset=utf-8", headers=headers
        )
    if wanted == "pdf":
        document = await run_in_threadpool(
            pdf.render_pdf,
            found["markdown"],
            created_at=found["completed_at"],
            font=pdf.unicode_font(),
        )
        headers["Content-Disposition"] = f'inline; filename="report-{ticket_id}.pdf"'
        return Response(document, media_type=pdf.MEDIA_TYPE, headers=headers)
    body = ReportBody.model_validate({**found, "projection": state})
    return json_response(body, state, vary="Accept")


@router.get(
    "/tickets/{ticket_id}/explain",
    response_model=Explanation,
    responses=SNAPSHOT_ERRORS,
    summary="Where each field of the ticket's report came from: subtask, events, prompt, model",
    operation_id="explainTicketReport",
    tags=["reports"],
)
async def explain_ticket(
    ticket_id: UUID, principal: SnapshotReader, deps: Deps, as_of: AsOf = None
) -> Explanation:
    """For each field of the report (`verdict.<key>`, `outputs.<subtask>.<key>`): the subtask
    that produced it, the positions of that subtask's events, the prompt's sha256 (its blob
    key), the model and the dependency outputs it was given (by position and sha256). Read from
    the ticket's events, so it explains any ticket, finished or not, now or `as_of`."""
    position = MAX_POSITION if as_of is None else await resolve_as_of(deps, as_of)
    return explain(await ticket_history(deps, principal.tenant, ticket_id, position))


async def _report_of(
    deps: QueryApiDeps, tenant: str, ticket_id: UUID
) -> tuple[ReportRef, dict[str, Any]]:
    async with deps.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        ticket = await queries.ticket(conn, tenant, ticket_id)
        found = await queries.report(conn, tenant, ticket_id)
        rerun_of = await queries.rerun_of(conn, ticket_id) if ticket else None
    if ticket is None:
        raise not_found(ticket_id)
    if found is None:
        raise not_completed(ticket_id, ticket["status"], "report")
    reference = ReportRef(
        ticket_id=ticket_id,
        pipeline_name=ticket["pipeline_name"],
        pipeline_version=ticket["pipeline_version"],
        rerun_of=rerun_of,
        position=found["position"],
    )
    return reference, found


@router.get(
    "/tickets/{ticket_id}/diff/{other_id}",
    response_model=ReportDiff,
    responses={
        **TICKET_ERRORS,
        403: forbidden_doc(*SNAPSHOT_READERS),
        409: error_doc(
            "ticket_not_completed",
            "Ticket 6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f is running; its report exists"
            " once it completes.",
        ),
    },
    summary="Two reports of the tenant compared field by field (e.g. a ticket and its re-run)",
    operation_id="diffTicketReports",
    tags=["reports"],
)
async def diff_tickets(
    ticket_id: UUID,
    other_id: UUID,
    principal: SnapshotReader,
    deps: Deps,
    min_position: MinPosition = None,
) -> ReportDiff:
    """Compares the verdicts and every subtask's output of two completed tickets of the
    caller's tenant. Each field is a path (`outputs.<subtask>.output.<key>…`); objects are
    walked, lists compared whole. Another tenant's ticket answers 404."""
    await wait_for_projection(deps, min_position)
    a, report_a = await _report_of(deps, principal.tenant, ticket_id)
    b, report_b = await _report_of(deps, principal.tenant, other_id)
    compared, changes = diff_reports(report_a, report_b)
    return ReportDiff(a=a, b=b, equal=not changes, compared=compared, changes=changes)


def not_completed(ticket_id: UUID, status: str, what: str) -> ApiError:
    """The 409 for a ticket without a report (`what`: the report, or what is made from it),
    saying whether one can still come."""
    if status == "cancelled":
        message = f"Ticket {ticket_id} was cancelled; it has no {what}."
    elif status == "failed":
        message = (
            f"Ticket {ticket_id} failed; it has no {what} unless a retry of its failed subtask"
            " completes it."
        )
    else:
        message = f"Ticket {ticket_id} is {status}; its {what} exists once it completes."
    return ApiError(409, "ticket_not_completed", message)


_NOT_COMPLETED_DOC = error_doc(
    "ticket_not_completed",
    "Ticket 6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f is running; its report exists once it completes.",
)


@router.get(
    "/tickets/{ticket_id}/cards.apkg",
    response_class=Response,
    responses={
        200: {
            "headers": {
                **PROJECTION_HEADERS,
                "Content-Disposition": {
                    "description": '`attachment; filename="flashcards-<ticket id>.apkg"`',
                    "schema": {"type": "string"},
                },
            },
            "content": {anki.MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            "description": "An Anki package: one deck, a Basic note per card and a Cloze note"
            " per card whose cloze sentence names its deleted term.",
        },
        **TICKET_ERRORS,
        403: forbidden_doc(*SNAPSHOT_READERS),
        409: {
            **_NOT_COMPLETED_DOC,
            "description": "`ticket_not_completed` while the ticket runs (or failed);"
            " `no_flashcards` for a completed ticket whose pipeline writes no flashcards.",
        },
    },
    summary="The flashcards of a completed flashcards ticket as an Anki package (.apkg)",
    operation_id="getTicketFlashcardsPackage",
    tags=["reports"],
)
async def get_flashcards_package(
    ticket_id: UUID, principal: SnapshotReader, deps: Deps, min_position: MinPosition = None
) -> Response:
    """The cards of the ticket's report as one Anki deck named after its documents. Each card is
    a Basic note (front, back); a card whose cloze sentence lets its deleted term be found in the
    back also gives a Cloze note (`{{c1::term}}`). Notes are tagged `ticketflow`,
    `difficulty::<level>` and, for cards repeating the tenant's earlier cards, `duplicate`. Ids
    are stable: importing the package of the same ticket again updates its notes. 409 while the
    ticket has no report, or when its pipeline writes no flashcards; another tenant's ticket
    answers 404."""
    async with live_snapshot(deps, min_position) as snapshot:
        ticket = await queries.ticket(snapshot.conn, principal.tenant, ticket_id)
        found = await queries.report(snapshot.conn, principal.tenant, ticket_id) if ticket else None
    state = snapshot.state
    if ticket is None:
        raise not_found(ticket_id)
    if found is None:
        raise not_completed(ticket_id, ticket["status"], "cards")
    try:
        cards = anki.report_flashcards(found["outputs"])
    except anki.NoFlashcards:
        raise ApiError(
            409,
            "no_flashcards",
            f"Ticket {ticket_id} ran pipeline {ticket['pipeline_name']}, which writes no"
            " flashcards.",
        ) from None
    package = await run_in_threadpool(
        anki.build_package, ticket_id, ticket["documents"], cards, found["completed_at"]
    )
    headers = {
        **projection_headers(state),
        "Content-Disposition": f'attachment; filename="flashcards-{ticket_id}.apkg"',
    }
    return Response(package, media_type=anki.MEDIA_TYPE, headers=headers)
