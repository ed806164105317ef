"""Jobs in the SDK: ``Client`` inherits these methods from ``JobsAPI``.

    with Client.from_config() as kiln:
        kiln.create_job("alice", "demo", "train", "main.py", schedule="0 3 * * *",
                        timezone="Europe/Berlin")
        run = kiln.run_job("alice", "demo", "train")
        run = kiln.wait_for_run("alice", "demo", "train", run.id)
        for chunk in kiln.iter_run_logs("alice", "demo", "train", run.id):
            print(chunk.decode(), end="")

A job is named by its name or id. A run has a site-wide ``id`` (the API's paths use it) and a
``number`` within its job (#1, #2, ...: what the UI and the CLI show; ``find_run`` looks one
up by it). ``wait_for_run`` polls until the run has ended (succeeded, failed, timed_out or
stopped).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from urllib.parse import quote

from kiln.sdk.errors import KilnSDKError
from kiln.sdk.models import _Model
from kiln.sdk.part import ClientPart
from kiln.sdk.streaming import stream_bytes

# A run in one of these states is over; the others (queued, waiting, starting, running,
# stopping) may still change.
ENDED_STATES = frozenset({"succeeded", "failed", "timed_out", "stopped"})
PENDING_STATES = frozenset({"queued", "waiting"})


class ParentRun(_Model):
    """The parent job's run whose success started a dependent run."""

    id: int
    number: int
    job: str
    job_id: int
    trigger: str


class JobRun(_Model):
    id: int
    number: int
    job: str
    state: str
    reason: str = ""
    exit_code: int | None = None
    trigger: str
    triggered_by: str | None = None
    scheduled_for: datetime | None = None
    attempt: int = 1
    parent_run_id: int | None = None
    parent_run: ParentRun | None = None
    workload_id: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration_seconds: float | None = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES


class Job(_Model):
    id: int
    project: str
    name: str
    script: str
    arguments: list[str] = []
    runtime: str | None = None
    profile: str | None = None
    env: dict[str, str] = {}
    schedule: str | None = None
    timezone: str = "UTC"
    catch_up: str = "once"
    next_run_at: datetime | None = None
    timeout_minutes: int | None = None
    max_retries: int = 0
    retry_backoff_seconds: int = 30
    max_concurrent_runs: int = 1
    webhook_url: str | None = None
    notify_on: list[str] = []
    parents: list[str] = []
    enabled: bool = True
    created_by: str | None = None
    created_at: datetime
    updated_at: datetime
    last_run: JobRun | None = None


class JobsAPI(ClientPart):
    """The jobs endpoints; mixed into ``kiln.sdk.Client``, which supplies the transport."""

    def _jobs(self, owner: str, slug: str) -> str:
        return f"{self._project(owner, slug)}/jobs"

    def _job(self, owner: str, slug: str, job: str | int) -> str:
        return f"{self._jobs(owner, slug)}/{quote(str(job), safe='')}"

    def list_jobs(self, owner: str, slug: str) -> list[Job]:
        """The project's jobs by name, each with its latest run and next scheduled time."""
        return [Job.model_validate(j) for j in self._request("GET", self._jobs(owner, slug)).json()]

    def get_job(self, owner: str, slug: str, job: str | int) -> Job:
        return Job.model_validate(self._request("GET", self._job(owner, slug, job)).json())

    def create_job(self, owner: str, slug: str, name: str, script: str, **fields: Any) -> Job:
        """Create a job. ``fields`` are the API's optional fields: arguments, runtime, profile,
        env, schedule, timezone, catch_up, timeout_minutes, max_retries,
        retry_backoff_seconds, max_concurrent_runs, webhook_url, notify_on, parents,
        enabled. ``None`` values are left out (the site's defaults apply)."""
        body = {"name": name, "script": script} | {k: v for k, v in fields.items() if v is not None}
        return Job.model_validate(self._request("POST", self._jobs(owner, slug), json=body).json())

    def update_job(self, owner: str, slug: str, job: str | int, **changes: Any) -> Job:
        """Change some fields; ``None`` clears schedule, timeout_minutes, webhook_url,
        runtime and profile."""
        response = self._request("PATCH", self._job(owner, slug, job), json=changes)
        return Job.model_validate(response.json())

    def delete_job(self, owner: str, slug: str, job: str | int) -> None:
        self._request("DELETE", self._job(owner, slug, job))

    def run_job(self, owner: str, slug: str, job: str | int) -> JobRun:
        """Queue a run now (operators and up); the runner starts it within moments."""
        response = self._request("POST", f"{self._job(owner, slug, job)}/runs")
        return JobRun.model_validate(response.json())

    def iter_runs(
        self, owner: str, slug: str, job: str | int, page_size: int = 50
    ) -> Iterator[JobRun]:
        """The job's runs, newest first, fetching pages as the iteration goes."""
        params: dict[str, Any] = {"limit": page_size}
        while True:
            page = self._request("GET", f"{self._job(owner, slug, job)}/runs", params=params)
            body = page.json()
            yield from (JobRun.model_validate(r) for r in body["items"])
            if not body.get("next_cursor"):
                return
            params["cursor"] = body["next_cursor"]

    def find_run(self, owner: str, slug: str, job: str | int, number: int) -> JobRun:
        """The job's run #``number``; ``KilnSDKError`` when it has none by that number."""
        params = {"number": int(number), "limit": 1}
        page = self._request("GET", f"{self._job(owner, slug, job)}/runs", params=params).json()
        if not page["items"]:
            raise KilnSDKError(f"job {job} has no run #{number}")
        return JobRun.model_validate(page["items"][0])

    def get_run(self, owner: str, slug: str, job: str | int, run_id: int) -> JobRun:
        response = self._request("GET", f"{self._job(owner, slug, job)}/runs/{int(run_id)}")
        return JobRun.model_validate(response.json())

    def cancel_run(self, owner: str, slug: str, job: str | int, run_id: int) -> JobRun:
        url = f"{self._job(owner, slug, job)}/runs/{int(run_id)}/cancel"
        return JobRun.model_validate(self._request("POST", url).json())

    def wait_for_run(
        self,
        owner: str,
        slug: str,
        job: str | int,
        run_id: int,
        timeout: float | None = None,
        interval: float = 0.5,
    ) -> JobRun:
        """Poll until the run has ended; ``KilnSDKError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = self.get_run(owner, slug, job, run_id)
            if run.ended:
                return run
            if deadline is not None and time.monotonic() > deadline:
                raise KilnSDKError(f"run {run_id} is still {run.state} after {timeout:g} s")
            time.sleep(interval)

    def iter_run_logs(
        self,
        owner: str,
        slug: str,
        job: str | int,
        run_id: int,
        offset: int = 0,
        follow: bool = False,
    ) -> Iterator[bytes]:
        """The console output of the run's latest attempt, from byte ``offset``. With
        ``follow`` the stream stays open until that attempt ends (no read timeout: a quiet
        job may print nothing for a long time)."""
        url = f"{self._job(owner, slug, job)}/runs/{int(run_id)}/logs"
        return self._stream_log(url, offset, follow)

    def _stream_log(self, url: str, offset: int, follow: bool) -> Iterator[bytes]:
        """A workload's console output from the API's ``.../logs`` at ``url`` (job runs,
        applications), from byte ``offset``; ``follow`` keeps it open without a read
        timeout (a quiet workload may print nothing for a long time)."""
        params = {"offset": offset, "follow": "true" if follow else "false"}
        yield from stream_bytes(self._http, url, params, follow)
