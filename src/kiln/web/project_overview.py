"""A project's Overview: what is happening (sessions that run, the latest job runs, the last
commits), its README rendered, and how to clone it with a command that works as shown.

The commits come from one bounded ``git log`` (``kiln.storage.history``); when git fails the
page still renders and says so in place of the commits.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse

from kiln.api.deps import Ctx, Db, ProjectAccess, ViewProject
from kiln.db.models import Project
from kiln.domain import jobs as jobs_domain
from kiln.domain import sessions as sessions_domain
from kiln.domain.errors import KilnError, NotFound
from kiln.domain.storage import format_bytes, project_quota, project_usage
from kiln.settings import Settings
from kiln.storage.history import Commit, recent_commits
from kiln.storage.safepath import parse_path
from kiln.web.markup import render_markdown
from kiln.web.project_pages import project_context, project_url
from kiln.web.rendering import UiCaller, UiRoute, path_url, render
from kiln.web.session_pages import EDITOR_LABELS
from kiln.web.text_files import read_text

router = APIRouter(route_class=UiRoute, include_in_schema=False)

README = "README.md"
SHOWN = 5  # sessions, runs and commits: the newest few, each list links to the rest
CA_PATH = "/ca.crt"


@dataclass(frozen=True)
class CloneHelp:
    """The commands the clone card shows: each works as shown, copied into a terminal."""

    git: str  # git alone (asks for the password: an API key)
    kiln: str  # with the kiln command: log in once, then clone (no password prompts)
    ca_file: str | None  # where this site's CA certificate is, on the server


def clone_help(settings: Settings, base_url: str, username: str, project: Project) -> CloneHelp:
    """``git clone`` with the site's CA (its certificate comes from Kiln's own CA, which git
    does not know): ``clone -c`` applies the setting to the clone and keeps it in the new
    repository, so later pulls and pushes work too. Behind a TLS proxy (``web.tls`` off) no
    CA setting is needed."""
    scheme, _, host = base_url.rstrip("/").partition("://")
    url = f"{scheme}://{username}@{host}/git/{project.owner_name}/{project.slug}.git"
    ref = f"{project.owner_name}/{project.slug}"
    if not settings.web.tls:
        kiln = f"kiln login {base_url}\nkiln projects clone {ref}"
        return CloneHelp(f"git clone {url}", kiln, None)
    ca = str((settings.pki_dir / "ca.crt").resolve())
    setting = f"http.sslCAInfo={shlex.quote(ca)}"
    return CloneHelp(
        git=f"git clone -c {setting} {url}",
        kiln=f"kiln login {base_url} --ca-file {shlex.quote(ca)}\nkiln projects clone {ref}",
        ca_file=ca,
    )


@dataclass(frozen=True)
class RunLine:
    job: str
    job_id: int
    id: int
    number: int
    state: str
    trigger: str
    at: datetime


def _runs(db: Db, project: Project) -> list[RunLine]:
    return [
        RunLine(job.name, job.id, run.id, run.number, run.state, run.trigger, run.created_at)
        for run, job in jobs_domain.recent_runs(db, project, SHOWN)
    ]


def _sessions(db: Db, project: Project) -> list[dict[str, Any]]:
    rows = sessions_domain.live_sessions(db, project, SHOWN)
    users = sessions_domain.usernames(db, {r.user_id for r in rows})
    return [
        {
            "id": r.id,
            "state": r.state,
            "editor": EDITOR_LABELS.get(r.editor, r.editor),
            "by": users.get(r.user_id) if r.user_id is not None else None,
            "at": r.created_at,
        }
        for r in rows
    ]


def _readme(ctx: Ctx, access: ProjectAccess) -> str | None:
    try:
        return read_text(ctx.store.project_dir(access.project.id), parse_path(README)).text
    except KilnError:  # no README (or not readable): the page simply goes without
        return None


def _disk(ctx: Ctx, db: Db, access: ProjectAccess) -> dict[str, Any]:
    """The project's usage against its quota: files (read from their filesystem: O(1)) and
    images in the registry."""
    quota = project_quota(access.project, ctx.settings)
    usage = project_usage(db, ctx.store, access.project.id)
    used = usage.used_bytes
    return {
        "used": format_bytes(used),
        "files": format_bytes(usage.files_bytes),
        "images": format_bytes(usage.images_bytes),
        "quota": format_bytes(quota),
        "used_bytes": used,
        "quota_bytes": quota,
        "percent": min(999, round(100 * used / quota)),
        "over": used >= quota,
    }


def _commits(ctx: Ctx, access: ProjectAccess) -> tuple[list[Commit], str]:
    """The last commits, or why they cannot be shown (the page says it in their place)."""
    try:
        return recent_commits(ctx.store.project_dir(access.project.id), SHOWN), ""
    except KilnError as exc:
        return [], exc.detail


@router.get("/p/{owner}/{project}")
def overview(request: Request, caller: UiCaller, access: ViewProject, ctx: Ctx, db: Db) -> Response:
    base = project_url(access)
    api_files = f"/api/v1/projects/{access.project.owner_name}/{access.project.slug}/files/"
    readme = _readme(ctx, access)
    commits, commits_error = _commits(ctx, access)
    # "Updated": the latest change Kiln recorded or the latest commit (a push, a session's).
    updated = max([access.project.updated_at, *(c.at for c in commits[:1])])
    return render(
        request,
        "project/overview.html",
        caller,
        clone=clone_help(ctx.settings, str(request.base_url), caller.user.username, access.project),
        readme=render_markdown(readme, f"{base}/files/", api_files) if readme else None,
        readme_path=path_url(README),
        commits=commits,
        commits_error=commits_error,
        sessions=_sessions(db, access.project),
        runs=_runs(db, access.project),
        updated=updated,
        disk=_disk(ctx, db, access),
        **project_context(access, "overview"),
    )


@router.get(CA_PATH)
def ca_certificate(ctx: Ctx) -> Response:
    """Kiln's CA certificate (public, like any CA certificate): what git, curl or a browser
    on another computer must trust to talk to this site."""
    path = ctx.settings.pki_dir / "ca.crt"
    if not path.is_file():
        raise NotFound("this site has no CA certificate of its own (it is served behind a proxy)")
    return FileResponse(
        path,
        media_type="application/x-pem-file",
        filename="kiln-ca.crt",
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )
