"""A project page people want to open: the Overview shows running sessions, recent job runs,
the last commits and the README rendered (safely); the file list shows each entry's last
commit; the viewer highlights code. Git is asked once per page, and a failing git never
takes a page down."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from kiln.db.engine import make_sessionmaker
from kiln.db.models import Project, User
from kiln.db.workload_models import Workload
from kiln.settings import Settings
from kiln.storage import history
from tests.conftest import Account
from tests.integration.test_sessions_support import make_project
from tests.integration.web_ui_client import UiClient, sign_in

pytestmark = pytest.mark.timeout(60)
PAGE = "/p/alice/demo"


@pytest.fixture
def alice_ui(app: FastAPI, alice: Account) -> UiClient:
    return sign_in(app, alice.username, alice.password)


@pytest.fixture
def project(client: TestClient, alice: Account) -> str:
    return make_project(client, alice)


def put(client: TestClient, project: str, who: Account, path: str, text: str) -> None:
    response = client.put(f"{project}/files/{path}", content=text.encode(), headers=who.headers)
    assert response.status_code in (200, 201), response.text


@pytest.fixture
def git_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Every git command the page runs for its history, as run_git gets it."""
    calls: list[tuple[str, ...]] = []
    real = history.run_git

    def counting(repo: Path, *args: str, **kwargs: Any) -> Any:
        calls.append(args)
        return real(repo, *args, **kwargs)

    monkeypatch.setattr(history, "run_git", counting)
    return calls


def test_overview_shows_sessions_runs_commits_and_the_readme(
    alice_ui: UiClient,
    client: TestClient,
    alice: Account,
    engine: Engine,
    project: str,
    git_calls: list[tuple[str, ...]],
) -> None:
    with make_sessionmaker(engine)() as db:
        user = db.scalars(select(User).where(User.username == "alice")).one()
        user.full_name = "Alice Liddell"
        db.commit()
    put(client, project, alice, "train.py", "print('train')\n")
    body = {"name": "train", "script": "train.py"}
    job = client.post(f"{project}/jobs", json=body, headers=alice.headers).json()
    run = client.post(f"{project}/jobs/train/runs", headers=alice.headers).json()
    with make_sessionmaker(engine)() as db:
        row = db.scalars(select(Project).where(Project.slug == "demo")).one()
        db.add(
            Workload(
                id="0123456789abcdef",
                kind="session",
                project_id=row.id,
                user_id=user.id,
                cpu_millis=1000,
                memory_bytes=2**30,
                editor="terminal",
                state="running",
            )
        )
        db.commit()

    git_calls.clear()
    page = alice_ui.page(PAGE)
    assert [c[0] for c in git_calls] == ["log"]  # the whole page asks git once
    sessions = page.split('id="live-sessions"')[1].split("</section>")[0]
    assert f'href="{PAGE}/sessions/0123456789abcdef"' in sessions and "running" in sessions
    runs = page.split('id="recent-runs"')[1].split("</section>")[0]
    link = f'href="{PAGE}/jobs/{job["id"]}/runs/{run["id"]}">train <span class="mono">#1</span>'
    assert link in runs
    assert "queued" in runs and "manual" in runs
    commits = page.split('id="commits"')[1].split("</section>")[0]
    # The newest first: the file written through the API is a commit by its author.
    subjects = re.findall(r'<span class="commit-subject">([^<]*)</span>', commits)
    authors = re.findall(r'<span class="commit-author">([^<]*)</span>', commits)
    assert subjects[0] == "Add train.py", subjects
    assert authors[0] == "Alice Liddell" and subjects[-1] == "Create project"
    readme = page.split('id="readme"')[1].split("</section>")[0]
    assert "<h1>" in readme and "# " not in readme  # rendered, not raw Markdown


def test_empty_activity_says_what_to_do(alice_ui: UiClient, project: str) -> None:
    page = alice_ui.page(PAGE)
    assert "No session is running." in page and f'href="{PAGE}/sessions">Start one</a>' in page
    assert "No job has run yet." in page and f'href="{PAGE}/jobs/new">Create a job</a>' in page


README_ATTACKS = """# Title

<script>alert('readme')</script>
<img src=x onerror="alert(1)">
<iframe src="https://evil.example"></iframe>

[click](javascript:alert(2)) [click2](JAVASCRIPT:alert(3))
[data](data:text/html;base64,PHNjcmlwdD4=)
<javascript:alert(4)>
![pixel](https://tracker.example/p.gif) ![local](docs/figure.png) ![pr](//tracker.example/p.gif)
[guide](docs/guide.md) [site](https://example.com/a?b=1) [mail](mailto:team@example.com)

```python
print("<script>alert(5)</script>")
```
"""


def test_the_readme_is_rendered_and_sanitized(
    alice_ui: UiClient, client: TestClient, alice: Account, project: str
) -> None:
    put(client, project, alice, "README.md", README_ATTACKS)
    response = alice_ui.http.get(PAGE)
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "img-src 'self' data:" in csp
    readme = response.text.split('<div class="markdown">')[1].split("</section>")[0]
    assert "<h1>Title</h1>" in readme
    assert "<script" not in readme and "<iframe" not in readme and "<img src=x" not in readme
    # Every link and picture that made it is the site's, https or mailto: never a script.
    targets = re.findall(r'(?:href|src)="([^"]*)"', readme)
    assert targets and all(t.startswith(("/", "https://", "mailto:")) for t in targets), targets
    tags = re.findall(r"<[a-z][^>]*>", readme)
    assert not [t for t in tags if re.search(r"\son\w+=", t)], tags  # no handlers
    assert "&lt;script&gt;alert(&#x27;readme&#x27;)&lt;/script&gt;" in readme or (
        "&lt;script&gt;alert('readme')&lt;/script&gt;" in readme
    )
    assert "tracker.example" not in readme  # pictures only from this site
    assert 'src="/api/v1/projects/alice/demo/files/docs/figure.png"' in readme
    assert f'href="{PAGE}/files/docs/guide.md"' in readme
    assert 'href="https://example.com/a?b=1" rel="noopener noreferrer nofollow"' in readme
    assert 'href="mailto:team@example.com"' in readme
    # Fenced code is highlighted, its text escaped.
    assert '<span class="nb">print</span>' in readme and "&lt;script&gt;alert(5)" in readme


def test_the_file_list_shows_each_entrys_last_commit(
    alice_ui: UiClient,
    client: TestClient,
    alice: Account,
    project: str,
    git_calls: list[tuple[str, ...]],
) -> None:
    put(client, project, alice, "data/raw.csv", "a,b\n")
    put(client, project, alice, "notes.md", "first\n")
    put(client, project, alice, "data/clean.csv", "a\n")
    git_calls.clear()
    page = alice_ui.page(f"{PAGE}/files/")
    assert [c[0] for c in git_calls] == ["log"]  # one git log for the whole folder

    def row(name: str) -> str:
        return page.split(f"</i>{name}</a>")[1].split("</tr>")[0]

    # A folder shows the newest commit of anything inside it.
    assert "Add data/clean.csv" in row("data") and "raw.csv" not in row("data")
    assert "Add notes.md" in row("notes.md")
    assert "Create project" in row("main.py")
    assert row("main.py").count("data-relative") >= 2  # committed and modified times
    inner = alice_ui.page(f"{PAGE}/files/data/")
    assert "Add data/raw.csv" in inner.split("</i>raw.csv</a>")[1].split("</tr>")[0]


def test_pages_still_render_when_git_fails(
    alice_ui: UiClient, project: str, settings: Settings, engine: Engine
) -> None:
    """A session's terminal can write anything into .git, breaking the repository; git then
    fails there. The pages show the files and say why the history is missing, in place."""
    with make_sessionmaker(engine)() as db:
        project_id = db.scalars(select(Project.id).where(Project.slug == "demo")).one()
    (settings.projects_dir / str(project_id) / ".git" / "HEAD").write_text("garbage\n")
    overview = alice_ui.page(PAGE)
    assert "The history cannot be shown:" in overview and "not a git repository" in overview
    assert 'class="markdown"' in overview  # the README is still there
    listing = alice_ui.page(f"{PAGE}/files/")
    assert "Last commits cannot be shown:" in listing and "</i>main.py</a>" in listing


def test_the_viewer_highlights_code_and_escapes_it(
    alice_ui: UiClient, client: TestClient, alice: Account, project: str
) -> None:
    put(client, project, alice, "evil.py", 'x = "</pre><script>alert(1)</script>"\n')
    page = alice_ui.page(f"{PAGE}/files/evil.py")
    view = page.split('id="file-content"')[1].split("</pre>")[0]
    assert '<span class="n">x</span>' in view
    assert "<script>" not in view and "&lt;/pre&gt;&lt;script&gt;" in view
    put(client, project, alice, "notes.unknownext", "<b>plain</b>\n")
    plain = alice_ui.page(f"{PAGE}/files/notes.unknownext")
    assert "&lt;b&gt;plain&lt;/b&gt;" in plain and "<b>plain</b>" not in plain


def test_overview_shows_disk_usage_against_the_quota(
    alice_ui: UiClient, client: TestClient, project: str, alice: Account, engine: Engine
) -> None:
    usage = client.get(f"{project}/usage", headers=alice.headers).json()
    page = alice_ui.page(PAGE)
    shown = re.search(r'<dd id="disk-usage">\s*(.*?) of (.*?)\s*<meter', page, re.S)
    assert shown is not None, page
    assert shown.group(2) == "10 GiB"
    assert f'value="{usage["used_bytes"]}"' in page and "over quota" not in page
    # Over the quota, the page says so and what it means.
    with make_sessionmaker(engine)() as db, db.begin():
        row = db.scalar(select(Project).where(Project.slug == "demo"))
        assert row is not None
        row.quota_bytes = 1024
    page = alice_ui.page(PAGE)
    assert "over quota" in page and "Writes are refused until files are deleted." in page
    assert re.search(r'<dd id="disk-usage">\s*\d+ KiB of 1 KiB', page), page
