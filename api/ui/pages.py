"""The dashboard's pages, under /ui: server-rendered (Jinja2, every value escaped), with a few scripts of our
own and uPlot, all served from /ui/static. A page reads what the JSON API's services read, scoped the same
way: a tenant's pages show its own jobs, files, models and webhooks (another tenant's id is a 404, as in the
API); the admin pages need an admin key. Buttons are forms that post to /ui with the session's CSRF token and
come back to the page (post, redirect, get); uploads, job creation and the live charts go through the JSON
API with the session cookie (`api.deps.principal`)."""

import json
from datetime import UTC, datetime
from hmac import compare_digest
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from api.deps import CSRF_HEADER, SESSION_COOKIE, DbSession, ReadSession, StorageDep, read_signed_in
from api.routers.admin import overview as admin_overview
from shared.auth import service as keys
from shared.auth.sessions import SignedIn, sign_in, sign_out
from shared.basemodels.service import list_base_models
from shared.catalog import service as catalog
from shared.errors import InvalidRequest, PermissionDenied, TunequeueError, Unauthenticated
from shared.exports import service as export_service
from shared.exports.schemas import ExportCreate, ExportObject
from shared.files import service as files
from shared.ids import now
from shared.jobs import service as jobs
from shared.jobs import state
from shared.jobs.schemas import CheckpointObject, FineTuningJob
from shared.jobs.status import JobStatus
from shared.settings import get_settings
from shared.webhooks import service as webhooks
from shared.workers import service as workers

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")  # autoescape on: every value users supply is escaped
PAGE = 50  # jobs per page


def _utc(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration_text(seconds: int | float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


templates.env.filters.update(utc=_utc, duration=_duration_text, size=_size)


class SignInRequired(Exception):
    """Raised by a page without a working session: answered with a redirect to the sign-in form."""

    def __init__(self, next_url: str):
        self.next_url = next_url


async def current(request: Request) -> SignedIn:
    """The signed-in caller of a page, read with its key on every request: a revoked key is signed out here."""
    found = await run_in_threadpool(read_signed_in, request.cookies.get(SESSION_COOKIE))
    if found is None:
        raise SignInRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return found


async def admin(user: Annotated[SignedIn, Depends(current)]) -> SignedIn:
    if not user.principal.admin:
        raise PermissionDenied("These pages are for admin keys only")
    return user


async def form_user(request: Request, user: Annotated[SignedIn, Depends(current)]) -> SignedIn:
    """For a form that changes state: the session's CSRF token must come back, in the form or the header."""
    form = await request.form()
    sent = str(form.get("csrf_token") or request.headers.get(CSRF_HEADER) or "")
    if not compare_digest(sent.encode(), user.csrf_token.encode()):
        raise PermissionDenied("This form's CSRF token is missing or stale: reload the page and try again")
    return user


async def form_admin(user: Annotated[SignedIn, Depends(form_user)]) -> SignedIn:
    return await admin(user)


User = Annotated[SignedIn, Depends(current)]
Admin = Annotated[SignedIn, Depends(admin)]
FormUser = Annotated[SignedIn, Depends(form_user)]
FormAdmin = Annotated[SignedIn, Depends(form_admin)]

router = APIRouter(prefix="/ui", include_in_schema=False)


def render(request: Request, name: str, user: SignedIn | None, status_code: int = 200, **context) -> HTMLResponse:
    return templates.TemplateResponse(
        request, name, {"user": user, "nav": name.split(".")[0], **context}, status_code=status_code
    )


def back(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


# Sign-in


@router.get("/sign-in")
def sign_in_form(request: Request, next: str = "/ui/jobs", error: str | None = None):
    return render(request, "sign_in.html", None, next=_local(next), error=error)


@router.post("/sign-in")
def sign_in_submit(
    request: Request, session: DbSession, api_key: Annotated[str, Form()] = "", next: Annotated[str, Form()] = ""
):
    """No CSRF token here: there is no session yet to hold one; SameSite=Strict on the cookie and the key
    itself (which an attacker would need) stand for it."""
    try:
        token = sign_in(session, api_key, get_settings().ui_session_hours)
    except Unauthenticated as exc:
        return render(request, "sign_in.html", None, status_code=401, next=_local(next), error=exc.message)
    response = back(_local(next))
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(get_settings().ui_session_hours * 3600),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https",
    )
    return response


@router.post("/sign-out")
def sign_out_submit(request: Request, session: DbSession, _: FormUser):
    sign_out(session, request.cookies.get(SESSION_COOKIE))
    response = back("/ui/sign-in")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def _local(url: str) -> str:
    """Only a path on this site: a sign-in link can never send the browser elsewhere."""
    return url if url.startswith("/ui") and not url.startswith("//") and "\\" not in url else "/ui/jobs"


@router.get("")
@router.get("/")
def home():
    return back("/ui/jobs")


# Jobs


@router.get("/jobs")
def job_list(
    request: Request,
    session: ReadSession,
    user: User,
    status: JobStatus | None = None,
    model: Annotated[str | None, Query(max_length=256)] = None,
    after: Annotated[str | None, Query(max_length=128)] = None,
):
    model = model or None
    selected = jobs.list_jobs(session, user.principal.tenant, after=after, limit=PAGE + 1, status=status, model=model)
    more = len(selected) > PAGE
    selected = selected[:PAGE]
    filters = {k: v for k, v in {"status": status, "model": model}.items() if v}
    next_url = "/ui/jobs?" + urlencode({**filters, "after": selected[-1].id}) if more else None
    return render(
        request,
        "jobs.html",
        user,
        jobs=[_job_row(job) for job in selected],
        statuses=[s.value for s in JobStatus],
        models=[m.id for m in list_base_models(session)],
        status=status,
        model=model,
        next_url=next_url,
        first_url="/ui/jobs?" + urlencode(filters) if after else None,
    )


def _job_row(job) -> dict:
    progress = job.progress or {}
    step, total = progress.get("step"), progress.get("total_steps")
    return {
        "id": job.id,
        "tenant": job.tenant,
        "status": job.status,
        "model": job.model,
        "fine_tuned_model": job.fine_tuned_model,
        "suffix": job.suffix,
        "created_at": job.created_at,
        "duration": _duration(job),
        "percent": round(100 * step / total) if step and total else (100 if job.status == "succeeded" else 0),
    }


def _duration(job) -> int | None:
    if job.started_at is None:
        return None
    return (job.finished_at or now()) - job.started_at


@router.get("/jobs/new")
def new_job(request: Request, session: ReadSession, user: User):
    tenant = user.principal.tenant
    return render(
        request,
        "new_job.html",
        user,
        models=[m.id for m in list_base_models(session)],  # what a job fine-tunes
        files=files.list_files(session, tenant, purpose="fine-tune", after=None, limit=200, order="desc"),
    )


@router.get("/jobs/{job_id}")
def job_page(request: Request, session: ReadSession, user: User, job_id: str):
    job = jobs.get_job(session, user.principal.tenant, job_id)
    shown = FineTuningJob.of(job).model_dump(mode="json")
    checkpoints = jobs.list_checkpoints(session, job, after=None, limit=50)
    name = jobs.fine_tuned_model_name(job)
    timeline = [
        {"at": e.created_at, "attempt": e.attempt, "status": (e.data or {})["status"], "message": e.message}
        for e in jobs.status_events(session, job)
    ]
    return render(
        request,
        "job.html",
        user,
        job=job,
        shown=shown,
        row=_job_row(job),
        timeline=timeline,
        attempts=_attempts(session, job, timeline),
        hyperparameters=json.dumps(
            {
                "method": shown.get("method"),
                "seed": shown.get("seed"),
                **{k: v for k, v in (job.training_options or {}).items()},
            },
            indent=2,
            sort_keys=True,
            default=str,
        ),
        report=job.validation_report,
        histogram=_histogram_bars((job.validation_report or {}).get("length")),
        checkpoints=[CheckpointObject.of(c, name) for c in checkpoints],
        exports=[
            ExportObject.of(e, *export_service.shown(e))
            for e in export_service.list_exports(session, user.principal.tenant, job.id, after=None, limit=50)
        ],
        export_choices=EXPORT_CHOICES,
        terminal=job.status in state.TERMINAL,
        can_cancel=job.status not in state.TERMINAL,
        can_pause=job.status in (JobStatus.QUEUED, JobStatus.RUNNING),
        can_resume=job.status == JobStatus.PAUSED,
    )


def _attempts(session, job, timeline: list[dict]) -> list[dict]:
    """Each attempt: the worker and devices that held it (the device-usage record), when, how it ended (the
    last transition recorded under that attempt, with its message) and its log."""
    attempts: dict[int, dict] = {}
    for hold in workers.holds_of_job(session, job.id):
        seen = attempts.setdefault(
            hold.attempt, {"attempt": hold.attempt, "worker": hold.worker, "devices": [], "started": None, "ended": 0}
        )
        seen["devices"].append(hold.device)
        seen["started"] = min(filter(None, [seen["started"], hold.started_at_ms // 1000]))
        seen["ended"] = (
            None if hold.ended_at_ms is None or seen["ended"] is None else max(seen["ended"], hold.ended_at_ms // 1000)
        )
    for transition in timeline:
        if transition["attempt"] in attempts and transition["status"] != "running":
            attempts[transition["attempt"]]["outcome"] = transition
    for seen in attempts.values():
        seen["log"] = f"/v1/fine_tuning/jobs/{job.id}/attempts/{seen['attempt']}/log"
    return [attempts[n] for n in sorted(attempts)]


def _histogram_bars(length: dict | None) -> list[dict]:
    """The report's length bins as bars of one scale (the fullest bin is the whole width)."""
    bins = (length or {}).get("bins") or []
    top = max((b["examples"] for b in bins), default=0) or 1
    return [
        {"label": f"{b['from']}–{b['to'] - 1}", "value": b["examples"], "width": round(100 * b["examples"] / top)}
        for b in bins
    ]


# What the job page's export form offers: (value, label), the value "format:dtype or quantization".
EXPORT_CHOICES = (
    ("merged:bfloat16", "merged safetensors, bfloat16"),
    ("merged:float16", "merged safetensors, float16"),
    ("merged:float32", "merged safetensors, float32"),
    ("gguf:q8_0", "GGUF q8_0 + Modelfile"),
    ("gguf:f16", "GGUF f16 + Modelfile"),
)


@router.post("/jobs/{job_id}/exports")
def job_export(session: DbSession, user: FormUser, job_id: str, export: Annotated[str, Form()] = "merged:bfloat16"):
    """The export form (`docs/export.md`): the same service as POST /v1/fine_tuning/jobs/{id}/exports."""
    if export not in dict(EXPORT_CHOICES):
        raise InvalidRequest(f"Unknown export {export!r}: one of {', '.join(dict(EXPORT_CHOICES))}", param="export")
    kind, detail = export.split(":")
    option = {"dtype": detail} if kind == "merged" else {"quantization": detail}
    export_service.create_export(
        session, user.principal.tenant, job_id, ExportCreate.model_validate({"format": kind, **option})
    )
    return back(f"/ui/jobs/{job_id}#exports")


@router.post("/jobs/{job_id}/{action}")
def job_action(session: DbSession, user: FormUser, job_id: str, action: str):
    act = {"cancel": jobs.cancel_job, "pause": jobs.pause_job, "resume": jobs.resume_job}.get(action)
    if act is None:
        raise InvalidRequest(f"Unknown action {action!r}: cancel, pause or resume", param="action")
    act(session, user.principal.tenant, job_id)
    return back(f"/ui/jobs/{job_id}")


# Files, models, webhooks


@router.get("/files")
def file_list(request: Request, session: ReadSession, user: User):
    tenant = user.principal.tenant
    return render(
        request,
        "files.html",
        user,
        files=files.list_files(session, tenant, purpose=None, after=None, limit=200, order="desc"),
        max_upload_bytes=get_settings().max_upload_bytes,
    )


@router.post("/files/{file_id}/delete")
def file_delete(session: DbSession, storage: StorageDep, user: FormUser, file_id: str):
    files.delete_file(session, storage, user.principal.tenant, file_id)
    return back("/ui/files")


@router.get("/models")
def model_list(
    request: Request, session: ReadSession, user: User, after: Annotated[str | None, Query(max_length=128)] = None
):
    tuned = catalog.tuned_models_page(session, user.principal.tenant, after=after, limit=PAGE + 1)
    return render(
        request,
        "models.html",
        user,
        base_models=[] if after else list_base_models(session),
        tuned=[model for _, model in tuned[:PAGE]],
        next_url=f"/ui/models?{urlencode({'after': tuned[PAGE - 1][0]})}" if len(tuned) > PAGE else None,
    )


@router.post("/models/delete")
def model_delete(session: DbSession, storage: StorageDep, user: FormUser, model_id: Annotated[str, Form()]):
    catalog.delete_model(session, storage, user.principal.tenant, model_id)
    return back("/ui/models")


@router.get("/webhooks")
def webhook_list(request: Request, session: ReadSession, user: User):
    endpoints = webhooks.list_endpoints(session, user.principal.tenant)
    return render(
        request,
        "webhooks.html",
        user,
        endpoints=[(e, webhooks.list_deliveries(session, e)[:20]) for e in endpoints],
    )


# Admin


@router.get("/admin")
def admin_page(request: Request, session: DbSession, user: Admin):
    data = admin_overview(session)
    stale_after = 3 * get_settings().heartbeat_seconds
    counts = jobs.counts_by_tenant(session)
    usage = {row["tenant"]: row["bytes"] for row in data["storage"]["tenants"]}  # the overview's own reading
    device_seconds = workers.device_seconds_by_tenant(session)
    tenants = sorted(set(counts) | set(usage) | {k.tenant for k in keys.list_keys(session)})
    failures: dict[str, int] = {}
    for job in data["recent_failures"]:
        code = (job["error"] or {}).get("code") or "unknown"
        failures[code] = failures.get(code, 0) + 1
    return render(
        request,
        "admin.html",
        user,
        data=data,
        stale_after=stale_after,
        throughput=jobs.finished_since(session, {"hour": now() - 3600, "day": now() - 86400}),
        failures_by_code=sorted(failures.items(), key=lambda item: -item[1]),
        tenants=[
            {
                "tenant": t,
                "jobs": sum(counts.get(t, {}).values()),
                "running": counts.get(t, {}).get("running", 0),
                "device_seconds": device_seconds.get(t, 0),
                "bytes": usage.get(t, 0),
            }
            for t in tenants
        ],
    )


@router.get("/admin/jobs")
def admin_jobs(
    request: Request,
    session: ReadSession,
    user: Admin,
    status: JobStatus | None = None,
    after: Annotated[str | None, Query(max_length=128)] = None,
):
    selected = jobs.list_jobs(session, None, after=after, limit=PAGE + 1, status=status)
    more = len(selected) > PAGE
    selected = selected[:PAGE]
    filters = {"status": status} if status else {}
    return render(
        request,
        "admin_jobs.html",
        user,
        jobs=[_job_row(job) for job in selected],
        statuses=[s.value for s in JobStatus],
        status=status,
        next_url="/ui/admin/jobs?" + urlencode({**filters, "after": selected[-1].id}) if more else None,
    )


@router.post("/admin/jobs/{job_id}/cancel")
def admin_cancel(session: DbSession, _: FormAdmin, job_id: str):
    jobs.cancel_job(session, None, job_id)
    return back("/ui/admin/jobs")


@router.get("/admin/keys")
def admin_keys(request: Request, session: ReadSession, user: Admin):
    return render(request, "admin_keys.html", user, keys=[keys.describe(k) for k in keys.list_keys(session)])


@router.post("/admin/keys")
def admin_create_key(
    request: Request,
    session: DbSession,
    user: FormAdmin,
    tenant: Annotated[str, Form()],
    name: Annotated[str, Form()] = "",
    is_admin: Annotated[bool, Form()] = False,
):
    key, secret = keys.create_key(session, tenant.strip(), admin=is_admin, name=name.strip() or None)
    # Shown once, on this response, never again (only its hash is kept).
    return render(
        request,
        "admin_keys.html",
        user,
        keys=[keys.describe(k) for k in keys.list_keys(session)],
        created={"id": key.id, "tenant": key.tenant, "secret": secret},
    )


@router.post("/admin/keys/{key_id}/revoke")
def admin_revoke_key(session: DbSession, _: FormAdmin, key_id: str):
    keys.revoke_key(session, key_id)
    return back("/ui/admin/keys")


def error_page(request: Request, exc: TunequeueError) -> Response:
    """An error on a page, as a page: the same status and message the JSON API would give."""
    token = request.cookies.get(SESSION_COOKIE)
    user = read_signed_in(token) if token else None
    return render(request, "error.html", user, status_code=exc.status_code, code=exc.status_code, message=exc.message)
