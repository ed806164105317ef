"""The runner's reconciler: makes what runs match what the database says should run.

Level-triggered and idempotent: each pass reads the desired state from the database and
acts on the difference, so a pass after a crash (of the runner or of the web tier) simply
continues. One thread runs the passes; it wakes every ``interval`` seconds, at once when the
web tier calls ``Wake`` (a run was queued or cancelled), and when a workload ends (the
runtime's exit listener). Slow work (stopping a workload takes its grace period; webhooks
wait on the network) goes to small thread pools so a pass never blocks on it.

A pass:

1. **Schedules**: for each enabled job with a cron schedule, the due slots since its anchor
   (``kiln.scheduling.cron.due_slots``, with the job's catch-up policy) become queued runs. The
   unique key ``(job_id, scheduled_for)`` makes each slot run exactly once, also across
   restarts and racing runners. While a run of the job is still queued or waiting, its due
   slots pass without a run: runs never pile up behind one that cannot start.
2. **Starts** pending runs, oldest first, that their job's ``max_concurrent_runs``, their
   retry ``not_before`` and their user's quota allow; the others wait with the reason shown.
3. **Watches** live runs: records endings, retries, dependent runs, webhooks, cancels.
4. **Sessions**: starts sessions that waited for quota, records sessions whose sandbox ended,
   stops idle ones (``IDLE_MAXIMUM_MINUTES``) and old ones (``SESSION_MAXIMUM_MINUTES``).
5. **Workers** of sessions that ended, however they ended: the runner stops them by itself
   (``kiln.runner.family``); their rows (and the quota they hold) follow.
6. **Applications**: their instances started, watched, restarted after a crash and replaced
   on a restart (``kiln.runner.applications``).
7. **Models**: deployments' replicas started on the model's image, probed until ready,
   switched to, drained, restarted after a crash (``kiln.runner.models``).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.models import Project, User, utcnow
from kiln.db.workload_models import Job, JobRun, Workload
from kiln.domain import model_metrics, session_editors, sessions, workers
from kiln.domain.control import WorkloadControl
from kiln.domain.errors import InvalidInput, KilnError
from kiln.domain.jobs import next_run_number
from kiln.domain.projects import list_env
from kiln.domain.resources import Resources, quota_wait_reason
from kiln.domain.storage import over_quota_note, warn_live_workloads_over_quota
from kiln.runner import jobruns
from kiln.runner.applications import ApplicationKeeper
from kiln.runner.jobruns import Notice
from kiln.runner.models import ModelKeeper
from kiln.scheduling.cron import Schedule, due_slots, parse_schedule
from kiln.scheduling.retry import IDLE_MAXIMUM_MINUTES, SESSION_MAXIMUM_MINUTES, limit_minutes
from kiln.scheduling.states import (
    LIVE_STATES,
    PENDING_STATES,
    Event,
    IllegalTransition,
    StopCause,
    WorkloadState,
)
from kiln.settings import Settings
from kiln.storage.store import project_store

log = logging.getLogger("kiln.runner.reconciler")

DEFAULT_INTERVAL = 1.0
START_WORKERS = 6  # concurrent sandbox starts: they mostly wait on child processes
DISK_CHECK_SECONDS = 10.0  # how often live workloads are told their project is over quota
METRICS_PRUNE_SECONDS = 600.0  # how often model metrics past their retention are deleted
# The web tier starts a session itself right after acknowledging it; the reconciler only
# takes queued sessions older than this (or waiting ones), so the two rarely race (and the
# compare-and-set settles it when they do).
SESSION_HANDOFF = dt.timedelta(seconds=3)
PENDING = [s.value for s in PENDING_STATES]
LIVE = [s.value for s in LIVE_STATES]

Deliver = Callable[[Notice], None]


@lru_cache(maxsize=1024)
def _schedule(expression: str, timezone: str) -> Schedule:
    return parse_schedule(expression, timezone)


class Reconciler:
    def __init__(
        self,
        sessionmaker_: sessionmaker[Session],
        runner: WorkloadControl,
        settings: Settings,
        *,
        deliver: Deliver,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.sessionmaker = sessionmaker_
        self.runner = runner
        self.settings = settings
        self.deliver = deliver
        self.interval = interval
        self.clock = clock
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._stops = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kiln-stop")
        self._stopping: set[str] = set()
        self._starts = ThreadPoolExecutor(
            max_workers=START_WORKERS, thread_name_prefix="kiln-start"
        )
        self._starting: set[int] = set()
        self._job_locks: dict[int, threading.Lock] = {}
        self._exited: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_error = ""
        self.store = project_store(settings)
        self._last_disk_check = 0.0
        self._last_metrics_prune = 0.0
        self.apps = ApplicationKeeper(runner, settings, self._stop)
        self.models = ModelKeeper(runner, settings, self._stop, sessionmaker_)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kiln-reconciler", daemon=True)
        self._thread.start()

    def wake(self, *_: object) -> None:
        self._wake.set()

    def on_exit(self, workload_id: str) -> None:
        """The runtime's exit listener: look at this workload now (a light pass)."""
        with self._lock:
            self._exited.add(workload_id)
        self._wake.set()

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._starts.shutdown(wait=True, cancel_futures=True)
        self._stops.shutdown(wait=True, cancel_futures=True)
        self.models.close()

    def _loop(self) -> None:
        last_full = 0.0
        while not self._closing.is_set():
            self._wake.clear()
            full = time.monotonic() - last_full >= self.interval
            if full:
                last_full = time.monotonic()
            self.run_once(full=full)
            self._wake.wait(max(0.0, self.interval - (time.monotonic() - last_full)))

    def run_once(self, full: bool = True) -> None:
        """One pass; errors are logged (once per distinct message) and the next pass retries.

        A *full* pass (every ``interval``) looks at everything. Between them, a wake (a
        queued run, a cancel, a workload's exit) runs a *light* pass: start what is pending,
        and look only at the workloads that exited and the runs being cancelled. With a
        hundred runs live, a full look at each exit would cost a hundred status checks."""
        with self._lock:
            exited, self._exited = self._exited, set()
        phases: list[Callable[[], None]] = [self.start_pending]
        if full:
            phases = [
                self.schedule,
                *phases,
                self.watch_live,
                self.sessions,
                self.orphaned_workers,
                self.applications,
                self.model_replicas,
                self.disk_pressure,
                self.model_metrics_retention,
            ]
        else:
            phases.append(lambda: self.watch_live(only=exited))
            if any(not w.startswith(("job-", "app-", "replica-")) for w in exited):
                phases += [self.sessions, self.orphaned_workers]
            if any(w.startswith("app-") for w in exited):
                phases.append(self.applications)
            if any(w.startswith("replica-") for w in exited):
                phases.append(self.model_replicas)
        for phase in phases:
            if self._closing.is_set():
                return
            try:
                phase()
            except Exception as exc:  # a pass must never kill the loop
                name = getattr(phase, "__name__", "watch_live")
                message = f"{name}: {exc}"
                if message != self._last_error:
                    log.exception("reconciler pass failed in %s", name)
                    self._last_error = message

    # ---- disk quotas ---------------------------------------------------------------------

    def _disk_note(self, db: Session, project_id: int) -> str:
        return over_quota_note(db, self.store, self.settings, project_id)

    def disk_pressure(self) -> None:
        """Every ``DISK_CHECK_SECONDS``: live workloads whose project went over its disk
        quota get a line in their timeline saying so (their writes are failing)."""
        if time.monotonic() - self._last_disk_check < DISK_CHECK_SECONDS:
            return
        self._last_disk_check = time.monotonic()
        with self.sessionmaker() as db:
            warn_live_workloads_over_quota(db, self.store, self.settings)

    def model_metrics_retention(self) -> None:
        """Every ``METRICS_PRUNE_SECONDS``: delete the metrics models tracked that are older
        than ``KILN_MODELS_METRICS_RETENTION_DAYS``."""
        if time.monotonic() - self._last_metrics_prune < METRICS_PRUNE_SECONDS:
            return
        self._last_metrics_prune = time.monotonic()
        with self.sessionmaker() as db:
            gone = model_metrics.prune(db, self.settings.models.metrics_retention_days)
        if gone:
            log.info("deleted %d model metrics records past their retention", gone)

    # ---- 1. cron ---------------------------------------------------------------------------

    def schedule(self) -> None:
        now = self.clock()
        with self.sessionmaker() as db:
            jobs = list(
                db.scalars(select(Job).where(Job.enabled.is_(True), Job.schedule.is_not(None)))
            )
            if not jobs:
                return
            ids = [j.id for j in jobs]
            newest = dict(
                db.execute(
                    select(JobRun.job_id, func.max(JobRun.scheduled_for))
                    .where(JobRun.job_id.in_(ids))
                    .group_by(JobRun.job_id)
                ).all()
            )
            pending = set(
                db.scalars(
                    select(JobRun.job_id)
                    .where(JobRun.job_id.in_(ids), JobRun.state.in_(PENDING))
                    .distinct()
                )
            )
            for job in jobs:
                self._schedule_job(db, job, newest.get(job.id), now, job.id in pending)

    def _schedule_job(
        self,
        db: Session,
        job: Job,
        newest: dt.datetime | None,
        now: dt.datetime,
        has_pending: bool,
    ) -> None:
        assert job.schedule is not None
        try:
            schedule = _schedule(job.schedule, job.timezone)
        except InvalidInput as exc:  # stored before a rule tightened: say so, do not crash
            log.error("job %d has an unusable schedule: %s", job.id, exc.detail)
            return
        anchors = [a for a in (job.schedule_anchor, newest) if a is not None]
        if not anchors:
            db.execute(update(Job).where(Job.id == job.id).values(schedule_anchor=now))
            db.commit()
            return
        slots = due_slots(schedule, max(anchors), now, job.catch_up)  # type: ignore[arg-type]
        if slots and has_pending:
            # A run of this job is still queued or waiting (for quota, for its concurrency):
            # another would only pile up behind it. The slot passes; the anchor moves on.
            db.execute(update(Job).where(Job.id == job.id).values(schedule_anchor=slots[-1]))
            db.commit()
            log.info("job %d: slot %s skipped, a run still waits", job.id, slots[-1].isoformat())
            return
        for slot in slots:
            try:
                with db.begin_nested():
                    db.add(
                        JobRun(
                            job_id=job.id,
                            number=next_run_number(db, job.id),
                            trigger="schedule",
                            scheduled_for=slot,
                            state=WorkloadState.QUEUED,
                            created_at=now,
                        )
                    )
            except IntegrityError:
                pass  # this slot's run exists (another runner, or before a restart): once only
        if slots:
            db.execute(update(Job).where(Job.id == job.id).values(schedule_anchor=slots[-1]))
            log.info("job %d: queued scheduled run(s) for %s", job.id, slots[-1].isoformat())
        db.commit()

    # ---- 2. start --------------------------------------------------------------------------

    def start_pending(self) -> None:
        """Hand each startable run to the start pool (a sandbox start takes tens of ms:
        several at once keep both cores busy, and the pass itself never waits on them)."""
        now = self.clock()
        with self.sessionmaker() as db:
            ids = list(
                db.scalars(
                    select(JobRun.id)
                    .where(
                        JobRun.state.in_(PENDING),
                        or_(JobRun.not_before.is_(None), JobRun.not_before <= now),
                    )
                    .order_by(JobRun.id)
                    .limit(500)
                )
            )
        for run_id in ids:
            with self._lock:
                if run_id in self._starting:
                    continue
                self._starting.add(run_id)
            self._starts.submit(self._start_one, run_id)

    def _start_one(self, run_id: int) -> None:
        try:
            if self._closing.is_set():
                return
            with self.sessionmaker() as db:
                run = db.get(JobRun, run_id)
                if run is None or run.state not in PENDING:
                    return
                with self._lock:
                    job_lock = self._job_locks.setdefault(run.job_id, threading.Lock())
                notices = jobruns.start(
                    db,
                    self.runner,
                    self.settings,
                    run,
                    self.clock(),
                    claim_lock=job_lock,
                    disk_note=self._disk_note,
                )
                self._send(notices)
        except IllegalTransition:
            pass  # cancelled or claimed meanwhile
        except Exception:
            log.exception("starting run %d failed", run_id)
        finally:
            with self._lock:
                self._starting.discard(run_id)

    # ---- 3. watch --------------------------------------------------------------------------

    def watch_live(self, only: set[str] | None = None) -> None:
        """Record endings, retries and cancels of live runs: all of them, or (``only``) the
        runs whose workload exited (runner ids ``job-<workload id>``) and those stopping."""
        now = self.clock()
        notices: list[Notice] = []
        query = select(JobRun).where(JobRun.state.in_(LIVE))
        if only is not None:
            ids = [w.removeprefix("job-") for w in only if w.startswith("job-")]
            query = query.where(
                or_(JobRun.workload_id.in_(ids), JobRun.state == WorkloadState.STOPPING)
            )
        with self.sessionmaker() as db:
            runs = list(db.scalars(query))
            with self._lock:
                starting = set(self._starting)
            for run in runs:
                if run.id in starting:
                    continue  # its start is in flight here: the runtime may not know it yet
                try:
                    found, needs_stop = jobruns.observe(db, self.runner, run, now, self._disk_note)
                except IllegalTransition:
                    db.rollback()
                    continue
                notices += found
                if needs_stop and run.workload_id:
                    self._stop(jobruns.runner_id(run.workload_id), "cancelled")
        self._send(notices)

    def _stop(self, runner_workload_id: str, reason: str, grace: float | None = None) -> None:
        """Stop a workload in the background (it takes the grace period), once at a time."""
        with self._lock:
            if runner_workload_id in self._stopping:
                return
            self._stopping.add(runner_workload_id)

        def stop() -> None:
            try:
                self.runner.stop(runner_workload_id, reason, grace)
            except KilnError as exc:
                log.warning("stopping %s failed: %s", runner_workload_id, exc.detail)
            finally:
                with self._lock:
                    self._stopping.discard(runner_workload_id)
                self.wake()  # record the ending now

        self._stops.submit(stop)

    def _send(self, notices: list[Notice]) -> None:
        for notice in notices:
            self.deliver(notice)

    # ---- 4. sessions -----------------------------------------------------------------------

    def sessions(self) -> None:
        now = self.clock()
        with self.sessionmaker() as db:
            rows = list(
                db.scalars(
                    select(Workload)
                    .where(Workload.kind == sessions.KIND, Workload.state.in_(PENDING + LIVE))
                    .order_by(Workload.created_at)
                )
            )
            for row in rows:
                try:
                    self._session(db, row, now)
                except IllegalTransition:
                    db.rollback()

    def _session(self, db: Session, row: Workload, now: dt.datetime) -> None:
        project = db.get(Project, row.project_id)
        if project is None:
            return
        state = WorkloadState(row.state)
        if state in PENDING_STATES:
            if state == WorkloadState.QUEUED and now - row.created_at < SESSION_HANDOFF:
                return
            self._start_waiting_session(db, project, row)
            return
        if state == WorkloadState.STOPPING:
            self._stop(sessions.runner_id(row), row.stop_cause or "stopped")
        sessions.refresh(db, self.runner, row)
        if row.state == WorkloadState.RUNNING:
            cause = self._session_limit(db, project, row, now)
            if cause is not None:
                sessions.add_event(db, row, f"{cause.reason}: stopping it")
                sessions.move(db, row, Event.STOP, stop_cause=cause.value)
                db.commit()
                self._stop(sessions.runner_id(row), cause.reason)

    def _start_waiting_session(self, db: Session, project: Project, row: Workload) -> None:
        user = db.get(User, row.user_id) if row.user_id else None
        if user is None or not user.is_active:
            sessions.move(
                db, row, Event.FAIL, reason="its user no longer exists", ended_at=utcnow()
            )
            db.commit()
            return
        request = Resources(row.cpu_millis, row.memory_bytes, row.gpu)
        reason = quota_wait_reason(db, self.settings, user, request, project)
        if reason:
            if row.reason != reason:
                sessions.move(db, row, Event.BLOCK, reason=reason[:500])
                sessions.add_event(db, row, reason)
                db.commit()
            return
        sessions.add_event(db, row, "room in the quota: starting")
        db.commit()
        sessions.launch(db, self.runner, project, row)

    def _session_limit(
        self, db: Session, project: Project, row: Workload, now: dt.datetime
    ) -> StopCause | None:
        env = {v.name: v.value for v in list_env(db, project)}
        try:
            idle = limit_minutes(env, IDLE_MAXIMUM_MINUTES)
            lifetime = limit_minutes(env, SESSION_MAXIMUM_MINUTES)
        except InvalidInput:
            idle = limit_minutes({}, IDLE_MAXIMUM_MINUTES)
            lifetime = limit_minutes({}, SESSION_MAXIMUM_MINUTES)
        started = row.started_at or row.created_at
        if now - started > dt.timedelta(minutes=lifetime):
            return StopCause.LIFETIME
        last = row.last_activity_at or started
        if now - last > dt.timedelta(minutes=idle):
            # A notebook computing with the browser closed sends nothing through the proxy:
            # ask the editor itself before calling the session idle.
            own = session_editors.editor_last_activity(row.editor, row.endpoint)
            if own is not None and now - own <= dt.timedelta(minutes=idle):
                db.execute(
                    update(Workload).where(Workload.id == row.id).values(last_activity_at=own)
                )
                db.commit()
                return None
            return StopCause.IDLE
        return None

    # ---- 5. workers ------------------------------------------------------------------------

    def orphaned_workers(self) -> None:
        with self.sessionmaker() as db:
            workers.settle_orphans(db, self.runner)

    # ---- 6. applications -------------------------------------------------------------------

    def applications(self) -> None:
        with self.sessionmaker() as db:
            self.apps.pass_over(db, self.clock())

    # ---- 7. models -------------------------------------------------------------------------

    def model_replicas(self) -> None:
        with self.sessionmaker() as db:
            self.models.pass_over(db, self.clock())
