"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright), against the
real stack: API and worker as processes, Postgres, Redis, S3. One user journey per tenant and one for the
admin, on one stack, in the order a person would click.

Set TUNEQUEUE_UI_SCREENSHOTS to a folder to keep a screenshot of each page (docs/dashboard.md shows them)."""

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.support import chat, write_jsonl

CHROMIUM = os.environ.get("TUNEQUEUE_CHROMIUM", "/usr/bin/chromium")
HOSTILE = "<script>window.__xss=1</script>\"'><img src=x onerror=window.__xss=2>"

# Skipped only outside CI (a developer's machine without the browser); CI installs it, and fails without it.
# What sticks out past a phone's screen: the first few elements, by tag and class, for the failure message.
TOO_WIDE = """Array.from(document.querySelectorAll('body *'))
  .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 1)
  .slice(0, 8).map((e) => e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))"""

pytestmark = pytest.mark.skipif(
    not shutil.which(CHROMIUM) and not os.environ.get("CI"),
    reason=f"no Chromium at {CHROMIUM} (`apt-get install -y chromium`; .ci/run installs it)",
)


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


class Person:
    """One browser context (its own cookies) signed in with one key; records every request it makes."""

    def __init__(self, browser, origin: str, key: str, shots: Path | None):
        self.context = browser.new_context(base_url=origin, viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.origin = origin
        self.requests: list[str] = []
        self.context.on("request", lambda request: self.requests.append(request.url))
        self.errors: list[str] = []  # scripts that threw, and what the console reported as errors
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.shots = shots
        self.page.goto("/ui/jobs")
        assert self.page.url.startswith(f"{origin}/ui/sign-in")  # no session: the sign-in form
        self.page.fill("input[name=api_key]", key)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(re.compile(r".*/ui/jobs$"))

    def shot(self, name: str) -> None:
        if self.shots is not None:
            self.page.screenshot(path=str(self.shots / f"dashboard-{name}.png"), full_page=False)

    def status(self) -> str:
        return self.page.inner_text("#status .badge")

    def wait_status(self, *statuses: str, timeout: float = 120) -> str:
        self.wait_until(lambda: self.status() in statuses, f"the status to become one of {statuses}", timeout)
        return self.status()

    def wait_until(self, condition, what: str, timeout: float = 120) -> None:
        """Polls the page from here: the pages' Content-Security-Policy forbids the string evaluation that
        Playwright's wait_for_function needs, and we keep it on."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
            self.page.wait_for_timeout(200)

    def points(self) -> int:
        return int(self.page.inner_text("#point-count"))


def test_the_dashboard_in_a_real_browser(browser, production_env, make_stack, tiny_model, tmp_path):
    shots = Path(os.environ["TUNEQUEUE_UI_SCREENSHOTS"]) if os.environ.get("TUNEQUEUE_UI_SCREENSHOTS") else None
    stack = make_stack(production_env, tiny_model)
    origin = str(stack.client.base_url).rstrip("/")
    acme, beta = stack.create_key("acme"), stack.create_key("beta")
    as_acme = {"Authorization": f"Bearer {acme}"}
    records = [chat(f"Tell me about item {i}", f"Squawk! Item {i}. Squawk!") for i in range(200)]
    hostile_file = write_jsonl(tmp_path / f"{HOSTILE}.jsonl".replace("/", "_"), records)
    with open(hostile_file, "rb") as stream:
        upload = stack.client.post(
            "/v1/files", files={"file": (hostile_file.name, stream)}, data={"purpose": "fine-tune"}, headers=as_acme
        )
    training, stored_name = upload.json()["id"], upload.json()["filename"]
    assert "<script>" in stored_name
    body = {"model": "tiny-llama", "training_file": training, "hyperparameters": {"n_epochs": 2, "batch_size": 1}}
    long_job = stack.client.post(
        "/v1/fine_tuning/jobs",
        json={
            **body,
            "hyperparameters": {"n_epochs": 10, "batch_size": 1},
            "suffix": "x-1",
            "metadata": {"note": HOSTILE},
        },
        headers=as_acme,
    ).json()["id"]  # ~2,000 steps: still training when the page is done with it
    queued_job = stack.client.post("/v1/fine_tuning/jobs", json=body, headers=as_acme).json()["id"]
    # A suffix is letters, digits, '-' and '_' (it becomes part of the model's name): markup never gets in.
    refused = stack.client.post("/v1/fine_tuning/jobs", json={**body, "suffix": HOSTILE[:40]}, headers=as_acme)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "suffix", refused.text
    add_event(production_env, long_job, f"A message quoting user text: {HOSTILE}")

    alice = Person(browser, origin, acme, shots)
    assert long_job in alice.page.inner_text("table.jobs") and queued_job in alice.page.inner_text("table.jobs")

    # Cancel a job that waits behind the first (the worker has one slot).
    alice.page.goto(f"/ui/jobs/{queued_job}")
    alice.page.click("form[data-action=cancel] button")
    alice.wait_status("cancelled", timeout=60)

    # A running job's page: its loss chart gains points while it trains, without a reload.
    alice.page.goto(f"/ui/jobs/{long_job}")
    alice.wait_status("running")
    alice.wait_until(lambda: alice.points() >= 2, "the chart's first points")
    before = alice.points()
    alice.wait_until(lambda: alice.points() >= before + 3, "new points while the job trains")
    assert alice.page.locator("#chart-loss canvas").count() == 1
    alice.wait_until(lambda: alice.page.inner_text("#eta") != "—", "the estimated finish")
    alice.shot("job-running")

    # Pause and resume with the buttons; the page follows the status by itself.
    alice.page.click("form[data-action=pause] button")
    alice.wait_status("paused")
    assert alice.page.is_visible("form[data-action=resume] button")
    assert not alice.page.is_visible("form[data-action=pause] button")
    alice.page.click("form[data-action=resume] button")
    assert alice.wait_status("queued", "running") in ("queued", "running")

    # A form post without the CSRF token is refused, and changes nothing.
    refused = alice.context.request.post(f"{origin}/ui/jobs/{long_job}/cancel", form={})
    assert refused.status == 403 and "CSRF" in refused.text()
    assert stack.client.get(f"/v1/fine_tuning/jobs/{long_job}", headers=as_acme).json()["status"] != "cancelled"

    # Upload with the files page (progress bar, then the list), then create a job with the form: its check
    # shows the validation report and the estimate before Create is allowed.
    alice.page.goto("/ui/files")
    alice.page.set_input_files("#upload input[type=file]", str(write_jsonl(tmp_path / "small.jsonl", records[:20])))
    alice.page.click("#upload button[type=submit]")
    alice.wait_until(lambda: "small.jsonl" in alice.page.inner_text("main table"), "the uploaded file in the list")
    files = stack.client.get("/v1/files", headers=as_acme).json()["data"]
    small_id = next(f["id"] for f in files if f["filename"] == "small.jsonl")
    alice.page.goto("/ui/jobs/new")
    assert alice.page.is_disabled("#create")
    alice.page.select_option("select[name=training_file]", value=small_id)
    alice.page.fill("input[name=suffix]", "from-form")
    alice.page.fill("input[name=n_epochs]", "1")
    alice.page.click("#check")
    alice.wait_until(lambda: alice.page.is_visible("#report"), "the dry run's report")
    report = alice.page.inner_text("#report")
    assert "Examples\n20" in report and "estimated time" in report, report
    alice.page.click("#create")
    alice.page.wait_for_url(re.compile(r".*/ui/jobs/ftjob-[0-9a-f]+$"))
    assert "from-form" in alice.page.inner_text(".facts")

    # What users wrote (metadata, file name, event text) renders as text, never as markup.
    alice.page.goto(f"/ui/jobs/{long_job}")
    alice.wait_until(lambda: "quoting user text" in alice.page.inner_text("#events"), "the event in the log")
    page_text = alice.page.inner_text("main")
    assert HOSTILE in page_text  # the metadata and the event text, shown as written
    alice.page.goto("/ui/files")
    assert stored_name in alice.page.inner_text("main")
    assert alice.page.evaluate("window.__xss") is None
    assert alice.page.locator("script:not([src])").count() == 0 and alice.page.locator("img[src=x]").count() == 0
    alice.shot("files")

    # Another tenant: the same URL is a 404, as in the JSON API.
    bob = Person(browser, origin, beta, None)
    assert bob.page.goto(f"/ui/jobs/{long_job}").status == 404
    assert "tiny-llama" not in bob.page.inner_text("main")  # nothing of the job but the id Bob asked for

    # The admin sees the worker and its slots, and revokes Bob's key: his open session ends on his next click.
    admin = Person(browser, origin, stack.key, shots)
    admin.page.goto("/ui/admin")
    workers = admin.page.inner_text("#workers")
    assert re.search(r"\d+ / 1\s+cpu", workers), workers
    admin.shot("admin")
    admin.page.goto("/ui/admin/keys")
    bob_key = stack.client.get("/admin/keys", params={"tenant": "beta"}).json()["data"][0]["id"]
    admin.page.click(f"tr[data-key='{bob_key}'] button")
    admin.page.wait_for_url(re.compile(r".*/ui/admin/keys$"))
    assert "revoked" in admin.page.inner_text(f"tr[data-key='{bob_key}']")
    bob.page.click("header nav a[href='/ui/jobs']")
    assert bob.page.url.startswith(f"{origin}/ui/sign-in")

    alice.page.goto("/ui/jobs")
    alice.shot("jobs")

    # On a phone: nothing wider than the screen (wide tables scroll inside their own box).
    phone = alice.context.new_page()
    phone.set_viewport_size({"width": 390, "height": 844})
    for path in ("/ui/jobs", f"/ui/jobs/{long_job}", "/ui/files", "/ui/jobs/new"):
        phone.goto(path)
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390, (path, phone.evaluate(TOO_WIDE))
    if shots is not None:
        phone.goto(f"/ui/jobs/{long_job}")
        phone.wait_for_timeout(1500)  # the charts drawn from the stream
        phone.screenshot(path=str(shots / "dashboard-phone.png"))
    phone.close()
    alice.page.goto(f"/ui/jobs/{long_job}")
    alice.wait_status("running", "succeeded")
    alice.wait_until(lambda: alice.points() >= 5, "the chart, drawn from the stream")
    alice.shot("job")

    # No page loaded anything from another origin, and no script failed.
    for person in (alice, bob, admin):
        strangers = [url for url in person.requests if not url.startswith(origin)]
        assert strangers == [], strangers
    assert alice.errors == [] and admin.errors == [], alice.errors + admin.errors
    assert all("404" in error or "401" in error for error in bob.errors), bob.errors  # the pages refused him
    for person in (alice, bob, admin):
        person.context.close()  # the pages' event streams end with them, before the stack stops


def add_event(env: dict[str, str], job_id: str, message: str) -> None:
    """An event whose text quotes what a user wrote, as a failing line of their data would be quoted."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from shared.ids import now
    from shared.jobs.models import JobEvent

    engine = create_engine(env["TUNEQUEUE_DATABASE_URL"])
    with Session(engine) as session, session.begin():
        session.add(JobEvent(job_id=job_id, attempt=0, created_at=now(), level="warn", message=message))
    engine.dispose()
