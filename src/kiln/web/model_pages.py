"""Models pages: a project's models, the create form, and one model's page — its status and
serving deployment, replicas with their state and logs, a test widget, call snippets,
builds, deployment history with rollback, request plots and tracked metrics.

As elsewhere in the UI, each action calls the API's handler (``kiln.api.models``,
``model_builds``, ``model_deploys``): rules, audit records, runner wake-ups and commits are
the API's own; this module parses forms and renders. Viewers look and test, operators
deploy, scale, stop and roll back, contributors create, build, rotate the key and delete.

**The test widget** posts the request to ``.../models/{name}/test``, a same-origin route
behind the browser's session: it needs the CSRF token like every form (htmx sends it) and
the role that may call the model (``authz.CALL_MODEL``: viewers and up, as for a model API
key). The call then goes through the model router's own path (``ModelRouter.call_model``:
the same balancing, queueing, timeout and request statistics as a call from outside), so
the page needs neither the model's access key, which Kiln keeps only hashed, nor a model
API key in the browser.
"""

from __future__ import annotations

import datetime as dt
import json
import pprint
import time
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Form, Query, Request, Response
from sqlalchemy import select

from kiln.api import model_builds as builds_api
from kiln.api import model_deploys as deploys_api
from kiln.api import models as api
from kiln.api.deps import (
    Ctx,
    Db,
    OperateProject,
    ProjectAccess,
    ViewProject,
    WriteProject,
    project_access,
)
from kiln.db.model_models import Model, ModelDeployment
from kiln.db.models import utcnow
from kiln.domain import model_metrics, model_replicas, model_stats, resources
from kiln.domain import models as domain
from kiln.domain.authz import CALL_MODEL
from kiln.domain.errors import InvalidInput, NotFound
from kiln.domain.model_deploys import current_deployment
from kiln.domain.session_access import session_origin
from kiln.domain.sessions import timelines
from kiln.scheduling.states import TERMINAL_STATES
from kiln.serving.balancer import Busy
from kiln.serving.model_server import MAX_DEPTH, CallFailed, too_deep
from kiln.serving.router import HOST_LABEL, PATH_PREFIX
from kiln.web.job_pages import duration, env_field, log_fragment
from kiln.web.log_chunks import read_chunk
from kiln.web.model_charts import RANGES, request_charts
from kiln.web.project_pages import project_context, project_url
from kiln.web.rendering import UiCaller, UiRoute, redirect, render

router = APIRouter(route_class=UiRoute, include_in_schema=False)

MODELS = "/p/{owner}/{project}/models"
MODEL = MODELS + "/{name}"
REPLICA = MODEL + "/replicas/{replica}"
ENDED = frozenset(str(s) for s in TERMINAL_STATES)
LIVE_DEPLOYMENT = frozenset({"deploying", "draining"})
SHOWN_BUILDS = 20
SHOWN_DEPLOYMENTS = 20
SHOWN_METRICS = 20  # the newest tracked-metrics records on the page
MAX_SHOWN_ANSWER = 64 * 1024

FormText = Annotated[str, Form(max_length=2000)]
# Whoever may call the model with a model API key may call it from the page.
CallModel = Annotated[ProjectAccess, project_access(CALL_MODEL)]


def _models_url(access: ProjectAccess) -> str:
    return project_url(access, "models")


def _context(access: ProjectAccess) -> dict[str, Any]:
    return {"models_url": _models_url(access), **project_context(access, "models")}


# ---- the project's models ------------------------------------------------------------------


@router.get(MODELS)
def models_page(
    request: Request, caller: UiCaller, access: ViewProject, ctx: Ctx, db: Db
) -> Response:
    public = api.list_models(access, request, ctx, db, 200, None).items
    current = {
        row.name: current_deployment(db, row)
        for row in domain.list_models(db, access.project, 200, None).items
    }
    rows = [{"m": m, "deployment": current.get(m.name)} for m in public]
    return render(request, "models/list.html", caller, models=rows, **_context(access))


def _form_choices(ctx: Ctx, db: Db) -> dict[str, Any]:
    return {
        "profiles": [p.name for p in resources.list_profiles(db)],
        "serving_modes": domain.SERVING_MODES,
        "max_concurrency": domain.MAX_CONCURRENCY,
        "unauthenticated_allowed": ctx.settings.models.allow_unauthenticated,
    }


@router.get(MODELS + "/new")
def new_model_page(
    request: Request, caller: UiCaller, access: WriteProject, ctx: Ctx, db: Db
) -> Response:
    return render(request, "models/form.html", caller, **_form_choices(ctx, db), **_context(access))


def _integer(value: str, field: str, default: int | None = None) -> int | None:
    text = value.strip()
    if not text:
        return default
    if not text.isdigit() or len(text) > 9:
        raise InvalidInput(f"{field} must be a whole number, not {text[:20]!r}", field)
    return int(text)


@router.post(MODELS + "/new")
def create_model(
    request: Request,
    caller: UiCaller,
    access: WriteProject,
    ctx: Ctx,
    db: Db,
    name: FormText = "",
    description: FormText = "",
    file: FormText = "",
    function: FormText = "",
    base: FormText = "",
    profile: FormText = "",
    serving_mode: FormText = "threads",
    concurrency: FormText = "",
    allow_unauthenticated: FormText = "",
    example_input: Annotated[str, Form(max_length=1_000_000)] = "",
) -> Response:
    """Create the model and show its access key, once (Kiln keeps only its hash)."""
    example: dict[str, Any] = {}
    if example_input.strip():  # empty: no example (the domain checks its depth and size)
        example["example_input"] = _json_text(example_input, "the example input", "example_input")
    body = api.ModelCreate(
        name=name.strip(),
        description=description.strip(),
        file=file.strip(),
        function=function.strip(),
        base=base.strip(),
        profile=profile,
        serving_mode=serving_mode,
        concurrency=_integer(concurrency, "concurrency"),
        allow_unauthenticated=allow_unauthenticated == "true",
        **example,
    )
    created = api.create_model(body, access, request, ctx, db)
    model_url = f"{_models_url(access)}/{created.name}"
    return render(
        request,
        "models/_key.html",
        caller,
        key=created.access_key,
        model_url=model_url,
        created=True,
        **_context(access),
    )


# ---- one model -----------------------------------------------------------------------------


def _model(db: Db, access: ProjectAccess, name: str) -> Model:
    return domain.get_model(db, access.project, name)


def _replica_views(db: Db, model: Model) -> list[dict[str, Any]]:
    views = model_replicas.model_slot_views(db, model)
    events = timelines(db, [v.workload.id for v in views])
    return [
        {
            "deployment": v.deployment,
            "replica": v.replica,
            "w": v.workload,
            "events": events.get(v.workload.id, [])[-3:],
        }
        for v in views
    ]


def _status_context(
    db: Db, access: ProjectAccess, name: str, request: Request, ctx: Ctx
) -> dict[str, Any]:
    """What the polled status card shows (and the page's other sections reuse)."""
    public = api.get_model(name, access, request, ctx, db)
    model = _model(db, access, name)
    deployments = deploys_api.list_deployments(name, access, db, SHOWN_DEPLOYMENTS, None).items
    serving = None
    if model.serving_deployment_id is not None:  # the router's truth, however old it is
        row = db.get(ModelDeployment, model.serving_deployment_id)
        if row is not None:
            serving = deploys_api.get_deployment(name, row.number, access, db)
    replicas = _replica_views(db, model)
    passing = any(d.state in LIVE_DEPLOYMENT for d in deployments) or any(
        v["w"].state not in ENDED and not v["replica"].ready for v in replicas
    )
    return {
        "m": public,
        "model": model,
        "deployments": deployments,
        "model_url": f"{_models_url(access)}/{name}",
        "serving": serving,
        "current": current_deployment(db, model),
        "deploying": next((d for d in deployments if d.state == "deploying"), None),
        "replicas": replicas,
        "passing": passing,
        **_context(access),
    }


def _endpoints(request: Request, ctx: Ctx) -> dict[str, Any]:
    url = request.url
    model_host = session_origin(ctx.settings.domain, url.scheme, url.port, HOST_LABEL)
    main_host = str(request.base_url).rstrip("/")
    return {"endpoint": f"{model_host}/model", "endpoint_main": f"{main_host}{PATH_PREFIX}/model"}


@router.get(MODEL)
def model_page(
    request: Request,
    name: str,
    caller: UiCaller,
    access: ViewProject,
    ctx: Ctx,
    db: Db,
    range_: Annotated[str, Query(alias="range", max_length=8)] = "hour",
) -> Response:
    status = _status_context(db, access, name, request, ctx)
    model = status["model"]
    build_rows = builds_api.list_model_builds(name, access, ctx, db, SHOWN_BUILDS, None).items
    totals = model_stats.by_deployment(db, model.id, utcnow(), 24 * 60)
    numbers = _deployment_numbers(db, model)
    return render(
        request,
        "models/detail.html",
        caller,
        builds=build_rows,
        builds_url=project_url(access, "builds"),
        day_totals={numbers[i]: t for i, t in totals.items() if i in numbers},
        duration=duration,
        profiles=[p.name for p in resources.list_profiles(db)],
        **_samples(model.example_input),
        tracked=_tracked_metrics(db, access, model),
        **_stats_context(db, model, range_),
        **_endpoints(request, ctx),
        **status,
    )


def _samples(example: Any) -> dict[str, Any]:
    """The test widget's request and the call snippets' ``request``: the model's example
    input when it has one, else ``{}``. Each as its language writes it: JSON for the widget
    and curl (its single quotes closed and reopened for the shell), a Python literal, and
    for R the JSON text that ``jsonlite::fromJSON`` reads back into lists."""
    value = {} if example is None else example
    compact = json.dumps(value, ensure_ascii=False)
    return {
        "sample": json.dumps(value, indent=2, ensure_ascii=False),
        "has_example": example is not None,
        "curl_request": compact.replace("'", "'\\''"),
        "python_request": pprint.pformat(value, width=80, sort_dicts=False),
        "r_request": compact.replace("\\", "\\\\").replace("'", "\\'"),
    }


def _tracked_metrics(db: Db, access: ProjectAccess, model: Model) -> list[dict[str, Any]]:
    """The newest records of ``cml.metrics_v1``, their metrics as short JSON text."""
    rows = model_metrics.latest(db, model, SHOWN_METRICS)
    published = model_metrics.publish(db, access.project, model, rows)
    for record in published:
        text = json.dumps(record["metrics"], sort_keys=True)
        record["text"] = text if len(text) <= 300 else text[:299] + "…"
        record["at"] = dt.datetime.fromtimestamp(record["startTimeStampMs"] / 1000, dt.UTC)
    return published


def _deployment_numbers(db: Db, model: Model) -> dict[int, int]:
    """Deployment id -> its number in the model (the statistics are kept by id)."""
    rows = db.execute(
        select(ModelDeployment.id, ModelDeployment.number).where(
            ModelDeployment.model_id == model.id
        )
    )
    return {deployment_id: number for deployment_id, number in rows}


@router.get(MODEL + "/status")
def model_status(
    request: Request, name: str, caller: UiCaller, access: ViewProject, ctx: Ctx, db: Db
) -> Response:
    return render(
        request, "models/_status.html", caller, **_status_context(db, access, name, request, ctx)
    )


def _stats_context(db: Db, model: Model, range_: str) -> dict[str, Any]:
    if range_ not in RANGES:
        raise InvalidInput(f"range must be one of {', '.join(RANGES)}", "range")
    minutes, step, label = RANGES[range_]
    points = model_stats.series(db, model.id, utcnow(), minutes, step)
    total = model_stats.Tally()
    for point in points:
        total.add(point.tally)
    return {
        "charts": request_charts(points, step),
        "range": range_,
        "range_label": label,
        "ranges": RANGES,
        "total": total,
    }


@router.get(MODEL + "/stats")
def model_stats_fragment(
    request: Request,
    name: str,
    caller: UiCaller,
    access: ViewProject,
    db: Db,
    range_: Annotated[str, Query(alias="range", max_length=8)] = "hour",
) -> Response:
    """The plots alone: the page refreshes them, and switches their range, with this."""
    model = _model(db, access, name)
    context = {
        "model_url": f"{_models_url(access)}/{name}",
        **_stats_context(db, model, range_),
    }
    return render(request, "models/_stats.html", caller, **context)


# ---- the test widget -----------------------------------------------------------------------


def _json_text(text: str, what: str, field: str) -> Any:
    """A form field's JSON text as its value; bad JSON is the field's error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not JSON: {exc}", field) from None
    except RecursionError:
        raise InvalidInput(f"{what} is nested too deeply", field) from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise InvalidInput(f"{what} cannot be read: {exc}", field) from None
    if too_deep(value, MAX_DEPTH):
        raise InvalidInput(f"{what} is nested more than {MAX_DEPTH} levels", field)
    return value


def _test_body(text: str, limit: int) -> bytes:
    """The widget's JSON as the body the router forwards (``{"request": ...}``)."""
    if len(text.encode()) > limit:
        raise InvalidInput(f"the request is over the limit of {limit} bytes", "request")
    value = _json_text(text, "the request", "request")
    return json.dumps({"request": value}, separators=(",", ":")).encode()


def _shown(answer: bytes) -> str:
    text = answer[:MAX_SHOWN_ANSWER].decode(errors="replace")
    try:
        return json.dumps(json.loads(answer), indent=2, ensure_ascii=False)[:MAX_SHOWN_ANSWER]
    except (ValueError, RecursionError):
        return text


def _model_id(db: Db, access: ProjectAccess, name: str) -> int:
    return _model(db, access, name).id


@router.post(MODEL + "/test")
async def test_model(
    request: Request,
    name: str,
    caller: UiCaller,
    access: CallModel,
    ctx: Ctx,
    db: Db,
    request_json: Annotated[str, Form(alias="request", max_length=20_000_000)] = "",
) -> Response:
    """Call the model once through the router, as the signed-in user (see the module's
    docstring), and show its answer."""
    model_id = await to_thread.run_sync(_model_id, db, access, name)
    body = _test_body(request_json, ctx.settings.models.max_body_bytes)
    model_router = getattr(request.app, "model_router", None)
    if model_router is None:
        raise NotFound("the model router is not running in this web process")
    started = time.perf_counter()
    try:
        answer = await model_router.call_model(model_id, body)
        status, text, replica = answer.status, _shown(answer.body), answer.replica_id
    except CallFailed as failed:
        status, text, replica = failed.status, failed.message, ""
    except Busy as busy:
        status, text, replica = 503, busy.detail, ""
    return render(
        request,
        "models/_test_result.html",
        caller,
        status=status,
        text=text,
        replica=replica,
        took_ms=(time.perf_counter() - started) * 1000,
    )


# ---- actions -------------------------------------------------------------------------------


def _back(request: Request, access: ProjectAccess, name: str, anchor: str = "") -> Response:
    return redirect(request, f"{_models_url(access)}/{name}{anchor}")


@router.post(MODEL + "/builds")
def build_model(
    request: Request,
    name: str,
    access: WriteProject,
    ctx: Ctx,
    db: Db,
    commit: FormText = "",
    comment: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    body = builds_api.ModelBuildCreate(commit=commit.strip() or None, comment=comment.strip())
    builds_api.create_model_build(name, access, request, ctx, db, body)
    return _back(request, access, name, "#builds")


@router.post(MODEL + "/deploy")
def deploy_model(
    request: Request,
    name: str,
    access: OperateProject,
    ctx: Ctx,
    db: Db,
    build: FormText = "",
    replicas: FormText = "1",
    profile: FormText = "",
    env: Annotated[str, Form(max_length=100_000)] = "",
) -> Response:
    """Deploy a build (the newest successful one when none is named); rollback is this with
    an older build's number."""
    body = deploys_api.DeploymentCreate(
        build=_integer(build, "build"),
        replicas=_integer(replicas, "replicas", 1) or 0,
        profile=profile or None,
        env=env_field(env),
    )
    deploys_api.deploy(name, body, access, request, ctx, db)
    return _back(request, access, name)


@router.post(MODEL + "/scale")
def scale_model(
    request: Request,
    name: str,
    access: OperateProject,
    ctx: Ctx,
    db: Db,
    replicas: FormText = "",
) -> Response:
    count = _integer(replicas, "replicas")
    if count is None:
        raise InvalidInput("replicas: how many replicas should serve the model?", "replicas")
    deploys_api.scale(name, deploys_api.Scale(replicas=count), access, request, ctx, db)
    return _back(request, access, name)


@router.post(MODEL + "/stop")
def stop_model(request: Request, name: str, access: OperateProject, ctx: Ctx, db: Db) -> Response:
    deploys_api.stop(name, access, request, ctx, db)
    return _back(request, access, name)


@router.post(MODEL + "/access-key")
def rotate_key(
    request: Request, name: str, caller: UiCaller, access: WriteProject, db: Db
) -> Response:
    """A new access key, shown once; the old one stops working within seconds."""
    key = api.rotate_access_key(name, access, request, db).access_key
    return render(
        request,
        "models/_key.html",
        caller,
        key=key,
        model_url=f"{_models_url(access)}/{name}",
        created=False,
        **_context(access),
    )


@router.post(MODEL + "/delete")
def delete_model(request: Request, name: str, access: WriteProject, db: Db) -> Response:
    api.delete_model(name, access, request, db)
    return redirect(request, _models_url(access))


# ---- one replica ---------------------------------------------------------------------------


def _replica_context(db: Db, access: ProjectAccess, name: str, replica: str) -> dict[str, Any]:
    model = _model(db, access, name)
    view = model_replicas.get_replica(db, model, replica[:32])
    deployment, row, workload = view.deployment, view.replica, view.workload
    model_url = f"{_models_url(access)}/{name}"
    return {
        "m": model,
        "deployment": deployment,
        "replica": row,
        "w": workload,
        "events": timelines(db, [workload.id])[workload.id],
        "model_url": model_url,
        # The log poller shared with job runs and builds asks {run_url}/log.
        "run_url": f"{model_url}/replicas/{workload.id}",
        "live": workload.state not in ENDED,
        **_context(access),
    }


@router.get(REPLICA)
def replica_page(
    request: Request, name: str, replica: str, caller: UiCaller, access: ViewProject, db: Db
) -> Response:
    context = _replica_context(db, access, name, replica)
    return render(
        request,
        "models/replica.html",
        caller,
        offset=0,
        attempt=1,
        done=False,
        problem="",
        oob=False,
        **context,
    )


@router.get(REPLICA + "/log")
def replica_log(
    request: Request,
    name: str,
    replica: str,
    caller: UiCaller,
    access: ViewProject,
    ctx: Ctx,
    db: Db,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
) -> Response:
    """The replica's output since ``offset`` (the poller shared with job runs and builds)."""
    context = _replica_context(db, access, name, replica)
    workload = context["w"]
    ended = not context["live"]

    def read() -> tuple[str, int]:
        if workload.started_at is None:
            return "", offset
        return read_chunk(request, ctx, model_replicas.runner_id(workload), offset, ended)

    return log_fragment(
        request,
        caller,
        read,
        offset=offset,
        ended=ended,
        attempt=1,
        new_attempt=False,
        context=context,
    )
