"""Administration pages for what workloads run on: runtimes, resource profiles and quotas.

As on the other admin pages (``kiln.web.admin_pages``), each action calls the API handler
(``kiln.api.resources``), which holds the rule (site admins only) and writes the audit
record. A refused action answers with the API's problem, which ``static/kiln.js`` shows in
the form that sent it, the admin's input kept; nothing is written.

Numbers arrive as the text the admin typed and are handed to the API's own input models, so
a bad number is refused here with the same message the API gives.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, cast

from fastapi import APIRouter, Form, Query, Request, Response

from kiln.api import resources as api
from kiln.api.deps import Ctx, Db
from kiln.api.schemas import PageOut
from kiln.domain import sessions
from kiln.domain.authz import require_site_admin
from kiln.domain.errors import InvalidInput
from kiln.web.rendering import UiCaller, UiRoute, is_htmx, render

router = APIRouter(prefix="/admin", route_class=UiRoute, include_in_schema=False)

PAGE_SIZE = 50
Cursor = Annotated[str | None, Query(max_length=200)]
Number = Annotated[str, Form(max_length=32)]
MemoryUnit = Annotated[Literal["GiB", "MiB"], Form()]
MIB_PER_UNIT = {"MiB": 1, "GiB": 1024}


def memory_mib(value: str, unit: str) -> int:
    """The memory the admin typed ("1.5" GiB, "512" MiB) in whole MiB, the API's unit.
    Rounded to the nearest MiB: nobody means a fraction of one."""
    try:
        amount = float(value.strip())
    except ValueError:
        raise InvalidInput(f"memory must be a number, not {value.strip()[:32]!r}") from None
    if not math.isfinite(amount):
        raise InvalidInput("memory must be a finite number")
    return round(amount * MIB_PER_UNIT[unit])


def memory_field(mib: int) -> tuple[str, str]:
    """How an edit form shows a memory size: whole GiB when it is one, else MiB."""
    return (f"{mib // 1024}", "GiB") if mib % 1024 == 0 else (str(mib), "MiB")


# ---- runtimes -----------------------------------------------------------------------------


def _runtimes(request: Request, caller: UiCaller, db: Db) -> Response:
    template = "admin/_runtimes.html" if is_htmx(request) else "admin/runtimes.html"
    runtimes = api.list_runtimes(db, caller.user)
    return render(request, template, caller, runtimes=runtimes, tab="runtimes")


@router.get("/runtimes")
def runtimes_page(request: Request, caller: UiCaller, db: Db) -> Response:
    # Every user may list runtimes through the API; this page is the admin's view of them.
    require_site_admin(caller.user)
    return _runtimes(request, caller, db)


@router.post("/runtimes")
def add_runtime(
    request: Request,
    caller: UiCaller,
    ctx: Ctx,
    db: Db,
    image: Annotated[str, Form(max_length=300)],
    name: Annotated[str, Form(max_length=64)] = "",
    description: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    require_site_admin(caller.user)
    body = api.RuntimeCreate(
        image=image.strip(), name=name.strip() or None, description=description.strip()
    )
    api.create_runtime(body, request, ctx, db, caller.user)
    return _runtimes(request, caller, db)


@router.post("/runtimes/{name}/default")
def make_default_runtime(request: Request, name: api.Name, caller: UiCaller, db: Db) -> Response:
    api.update_runtime(name, api.RuntimeUpdate(is_default=True), request, db, caller.user)
    return _runtimes(request, caller, db)


# ---- resource profiles --------------------------------------------------------------------


def _profiles(request: Request, caller: UiCaller, db: Db) -> Response:
    template = "admin/_profiles.html" if is_htmx(request) else "admin/profiles.html"
    return render(
        request,
        template,
        caller,
        profiles=api.list_profiles(db, caller.user),
        fallback_cpu=sessions.DEFAULT_CPU_MILLIS / 1000,
        fallback_memory=sessions.DEFAULT_MEMORY_BYTES,
        tab="profiles",
    )


@router.get("/profiles")
def profiles_page(request: Request, caller: UiCaller, db: Db) -> Response:
    require_site_admin(caller.user)
    return _profiles(request, caller, db)


@router.post("/profiles")
def create_profile(
    request: Request,
    caller: UiCaller,
    db: Db,
    name: Annotated[str, Form(max_length=64)],
    cpu: Number,
    memory: Number,
    memory_unit: MemoryUnit = "GiB",
    gpu: Number = "0",
    is_default: Annotated[bool, Form()] = False,
) -> Response:
    require_site_admin(caller.user)  # before parsing: a non-admin learns nothing from errors
    body = api.ProfileIn.model_validate(
        {
            "name": name.strip(),
            "cpu": cpu.strip(),
            "memory_mib": memory_mib(memory, memory_unit),
            "gpu": gpu.strip() or "0",
            "is_default": is_default,
        }
    )
    api.create_profile(body, request, db, caller.user)
    return _profiles(request, caller, db)


@router.get("/profiles/{name}/edit")
def edit_profile_form(request: Request, name: api.Name, caller: UiCaller, db: Db) -> Response:
    """The profile's table row as a form (swapped in place of the row)."""
    require_site_admin(caller.user)
    profile = api.get_profile(name, db, caller.user)
    memory, unit = memory_field(profile.memory_mib)
    return render(request, "admin/_profile_edit.html", caller, p=profile, memory=memory, unit=unit)


@router.post("/profiles/{name}")
def update_profile(
    request: Request,
    name: api.Name,
    caller: UiCaller,
    db: Db,
    cpu: Number,
    memory: Number,
    memory_unit: MemoryUnit = "GiB",
    gpu: Number = "0",
) -> Response:
    require_site_admin(caller.user)
    body = api.ProfileUpdate.model_validate(
        {
            "cpu": cpu.strip(),
            "memory_mib": memory_mib(memory, memory_unit),
            "gpu": gpu.strip() or "0",
        }
    )
    api.update_profile(name, body, request, db, caller.user)
    return _profiles(request, caller, db)


@router.post("/profiles/{name}/default")
def make_default_profile(request: Request, name: api.Name, caller: UiCaller, db: Db) -> Response:
    api.update_profile(name, api.ProfileUpdate(is_default=True), request, db, caller.user)
    return _profiles(request, caller, db)


@router.delete("/profiles/{name}")
def delete_profile(request: Request, name: api.Name, caller: UiCaller, db: Db) -> Response:
    api.delete_profile(name, request, db, caller.user)
    return _profiles(request, caller, db)


# ---- quotas -------------------------------------------------------------------------------


def _quotas(request: Request, caller: UiCaller, ctx: Ctx, db: Db, cursor: str | None) -> Response:
    template = "admin/_quotas.html" if is_htmx(request) else "admin/quotas.html"
    page = cast(PageOut[api.QuotaOverrideOut], api.list_quotas(db, caller.user, PAGE_SIZE, cursor))
    return render(
        request,
        template,
        caller,
        default=api.get_default_quota(ctx, caller.user),
        overrides=page.items,
        next_cursor=page.next_cursor,
        paged=cursor is not None,
        tab="quotas",
    )


@router.get("/quotas")
def quotas_page(
    request: Request, caller: UiCaller, ctx: Ctx, db: Db, cursor: Cursor = None
) -> Response:
    return _quotas(request, caller, ctx, db, cursor)


@router.post("/quotas")
def set_quota(
    request: Request,
    caller: UiCaller,
    ctx: Ctx,
    db: Db,
    kind: Annotated[Literal["user", "team"], Form()],
    name: Annotated[str, Form(max_length=64)],
    cpu: Number,
    memory: Number,
    memory_unit: MemoryUnit = "GiB",
    gpu: Number = "0",
) -> Response:
    """Set (or replace) one user's or team's quota."""
    require_site_admin(caller.user)
    body = api.QuotaIn.model_validate(
        {
            "cpu": cpu.strip(),
            "memory_mib": memory_mib(memory, memory_unit),
            "gpu": gpu.strip() or "0",
        }
    )
    setter = api.set_user_quota if kind == "user" else api.set_team_quota
    setter(name.strip(), body, request, db, caller.user)
    return _quotas(request, caller, ctx, db, None)


@router.delete("/quotas/{kind}/{name}")
def remove_quota(
    request: Request,
    kind: Literal["users", "teams"],
    name: api.Name,
    caller: UiCaller,
    ctx: Ctx,
    db: Db,
) -> Response:
    """The user or team goes back to the site default."""
    remover = api.remove_user_quota if kind == "users" else api.remove_team_quota
    remover(name, request, db, caller.user)
    return _quotas(request, caller, ctx, db, None)
