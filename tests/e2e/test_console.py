"""The operator console in headless Chromium, against both APIs served over real HTTP.

Logs in with e-mail and password, opens a ticket and watches it complete live (the work of the
handlers is done through the command service, the projector runs in a thread), opens its
timeline, then retries a subtask that failed for good from the dead-letter list. Any console
error or uncaught page error fails the test. Screenshots go to tests/artifacts/ (git-ignored).

Chromium is Debian's (`scripts/install --dev`); Playwright drives it, nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from commands.messages import (
    CompleteSubtask,
    CreateTicket,
    FailSubtask,
    RecordIngestion,
    UploadedDocument,
)
from projections import Projector
from streams import contract
from tests.conftest import Servers
from tests.integration.conftest import service_for
from tests.integration.served_apis import served_apis
from tests.support import random_tenant, sample

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "correct horse battery staple"
PDF = sample("research-paper.pdf").read_bytes()
USAGE = contract.TokenUsage(prompt_tokens=10, completion_tokens=5)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")


def project_until(database_url: str, stop: threading.Event) -> threading.Thread:
    async def loop() -> None:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            projector = Projector(pool)
            while not stop.is_set():
                await projector.catch_up()
                await asyncio.sleep(0.2)
        finally:
            await pool.close()

    thread = threading.Thread(target=lambda: asyncio.run(loop()), daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(110)
def test_console_login_live_progress_timeline_and_retry(servers: Servers) -> None:
    from playwright.sync_api import ConsoleMessage, expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    stop = threading.Event()
    with served_apis(servers) as apis, httpx.Client(base_url=apis.commands_url) as commands:
        projector = project_until(apis.database_url, stop)
        service = service_for(apis.settings, apis.database_url)
        try:
            tenant = random_tenant()
            founder = commands.post(
                "/auth/register",
                json={"tenant": tenant, "email": "ops@example.org", "password": PASSWORD},
            )
            assert founder.status_code == 201, founder.text
            owner = str(founder.json()["user"]["user_id"])

            def new_ticket() -> uuid.UUID:
                document = UploadedDocument("main", "paper.pdf", "application/pdf", PDF)
                created = service.create_ticket(CreateTicket(tenant, owner, (document,), "tiny"))
                ingested = contract.IngestedDocument(
                    role="main", sha256="0" * 64, characters=100, chunks=1
                )
                service.record_ingestion(RecordIngestion(created.ticket_id, (ingested,)))
                return created.ticket_id

            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
                page = browser.new_page()

                def on_console(message: ConsoleMessage) -> None:
                    if message.type == "error":
                        errors.append(message.text)

                page.on("console", on_console)
                page.on("pageerror", lambda error: errors.append(str(error)))

                # Log in: e-mail and password, through the command API.
                page.goto(f"{apis.queries_url}/console")
                page.wait_for_url("**/console/login")
                page.fill("input[name=tenant]", tenant)
                page.fill("input[name=email]", "ops@example.org")
                page.fill("input[name=password]", PASSWORD)
                page.click("#login-form button")
                page.wait_for_url("**/console")

                # A ticket runs; its page follows it live until it completes.
                ticket_id = new_ticket()
                expect(page.locator(f"a[href='/console/tickets/{ticket_id}']")).to_be_visible(
                    timeout=15_000
                )
                page.click(f"a[href='/console/tickets/{ticket_id}']")
                expect(page.locator("#stream-state")).to_have_text("live", timeout=10_000)
                for subtask in ("a", "b", "c", "d"):
                    service.complete_subtask(
                        CompleteSubtask(ticket_id, subtask, 1, {"x": subtask}, "m", USAGE, 3.0)
                    )
                expect(page.locator("li.live-event[data-name=completed]")).to_be_visible(
                    timeout=15_000
                )
                expect(page.locator("#stream-state")).to_have_text("ended")
                expect(page.locator("#ticket-status")).to_have_text("completed", timeout=15_000)
                expect(page.locator("#report")).to_be_visible()
                page.screenshot(path=str(ARTIFACTS / "console-ticket.png"), full_page=True)

                # Its timeline: positions, trace ids, the chain verified.
                page.click("#show-timeline")
                expect(page.locator("#chain")).to_contain_text("verified", timeout=10_000)
                expect(page.locator("tr.event[data-name=completed]")).to_have_count(1)
                trace_ids = page.locator("tr.event td:nth-child(5) code").all_inner_texts()
                assert all(len(trace_id) == 32 for trace_id in trace_ids), trace_ids
                page.screenshot(path=str(ARTIFACTS / "console-timeline.png"), full_page=True)

                # A subtask fails for good: the dead letter is retried from the console.
                failed = new_ticket()
                service.fail_subtask(FailSubtask(failed, "a", 1, "output never validates", False))
                page.goto(f"{apis.queries_url}/console/operations")
                row = page.locator(f"tr.dead-letter[data-ticket='{failed}']")
                expect(row).to_be_visible(timeout=15_000)
                expect(page.locator("#projection-lag")).to_be_visible()
                page.screenshot(path=str(ARTIFACTS / "console-operations.png"), full_page=True)
                row.locator("button.retry").click()
                # Re-opened, it leaves the list once projected (the list refreshes after a POST).
                expect(row).to_have_count(0, timeout=15_000)
                ticket = service.get_ticket(failed, tenant)
                assert ticket.status.value == "running"
                assert ticket.subtasks["a"].attempt == 2
                browser.close()
        finally:
            stop.set()
            projector.join(10)
            service.close()
    print(f"console screenshots: {ARTIFACTS}")
    assert errors == [], errors
