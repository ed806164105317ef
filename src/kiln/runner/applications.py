"""The reconciler's applications phase: keep each application's instances matching what its
users want (``Application.desired``).

For an application wanted running, each pass:

1. **A replacement** (``next_workload_id``: a restart or an update) is started beside the
   serving instance; once it answers it takes over (a compare-and-set on the application) and
   the old instance is stopped, so traffic switches only to an instance that answers. One
   that fails to start is dropped, saying why; the old instance keeps serving.
2. **The serving instance** is started (when its user's and team's quota allow; it waits with
   the reason otherwise), watched until its app answers, and watched while it runs. When it
   ends without being asked to, that is a *crash*: the next instance starts after an
   exponential back-off (1 s doubling to 5 min), and from ``CRASH_LOOP`` crashes in a row the
   application shows as crash-looping, with the last lines its instance printed. An instance
   that served for ``STABLE_SECONDS`` before it crashed starts the count afresh.

An application wanted stopped has its instances stopped. Instances no application points at
any more (replaced, or their application deleted) are stopped too, a replaced one only after
``DRAIN_SECONDS`` (``Workload.expires_at``). There is no idle timeout. Instances are
workloads like sessions: they outlive a runner restart, which re-attaches to them.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from kiln.db.app_models import Application
from kiln.db.models import Project
from kiln.db.workload_models import Workload
from kiln.domain import app_instances as instances
from kiln.domain import applications as apps
from kiln.domain.app_instances import Look
from kiln.domain.control import WorkloadControl
from kiln.domain.sessions import add_event
from kiln.runner import served
from kiln.runner.served import StopLater
from kiln.scheduling.states import (
    LIVE_STATES,
    PENDING_STATES,
    TERMINAL_STATES,
    IllegalTransition,
    StopCause,
    WorkloadState,
)
from kiln.settings import Settings

log = logging.getLogger("kiln.runner.applications")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0
STABLE_SECONDS = 120.0
# A replaced instance keeps running this long, so requests the proxy admitted to it before
# the switch (it trusts an admission for a few seconds) still find it; then it is stopped.
DRAIN_SECONDS = 10.0


def backoff(crashes: int) -> float:
    """Seconds before the start that follows the ``crashes``-th crash in a row."""
    return min(BACKOFF_FIRST * 2 ** max(0, crashes - 1), BACKOFF_MAX)


class ApplicationKeeper:
    def __init__(self, runner: WorkloadControl, settings: Settings, stop_later: StopLater) -> None:
        self.runner = runner
        self.settings = settings
        self.stop_later = stop_later

    @property
    def start_seconds(self) -> float:
        return float(self.settings.runner.app_start_seconds)

    def pass_over(self, db: Session, now: dt.datetime) -> None:
        """One look at every application that wants running or still has an instance, and
        at every instance that no application points at any more."""
        self._sweep(db, now)
        live = [s.value for s in PENDING_STATES | LIVE_STATES]
        busy = select(Workload.id).where(Workload.kind == apps.KIND, Workload.state.in_(live))
        query = (
            select(Application)
            .where(
                (Application.desired == apps.RUNNING)
                | Application.workload_id.in_(busy)
                | Application.next_workload_id.in_(busy)
            )
            .order_by(Application.id)
        )
        for app_id in [a.id for a in db.scalars(query)]:
            app = db.get(Application, app_id)
            if app is None:
                continue
            try:
                self.reconcile(db, app, now)
            except IllegalTransition:
                db.rollback()  # the web tier moved an instance first: the next pass looks again
            except Exception:
                db.rollback()
                log.exception("application %d: reconciling failed", app_id)

    # ---- one application -------------------------------------------------------------------

    def reconcile(self, db: Session, app: Application, now: dt.datetime) -> None:
        project = db.get(Project, app.project_id)
        if project is None:
            return
        if app.desired != apps.RUNNING:
            self._wind_down(db, app, now)
            return
        self._replacement(db, project, app, now)
        current = apps.current_instance(db, app)
        if current is None or WorkloadState(current.state) in TERMINAL_STATES:
            current = self._next_serving(db, app, current, now)
            if current is None:
                return
        self._advance(db, project, app, current, now, replacing=False)

    def _replacement(
        self, db: Session, project: Project, app: Application, now: dt.datetime
    ) -> None:
        pending = apps.next_instance(db, app)
        if pending is None:
            return
        look = self._advance(db, project, app, pending, now, replacing=True)
        if look in (Look.READY, Look.RUNNING):
            old = apps.take_over(db, app, pending)
            app.crashes, app.restart_at, app.status_message = 0, None, ""
            if old is not None and WorkloadState(old.state) in LIVE_STATES | PENDING_STATES:
                old.expires_at = now + dt.timedelta(seconds=DRAIN_SECONDS)
                add_event(db, old, f"replaced by {pending.id}: stops in {DRAIN_SECONDS:.0f} s")
            db.commit()
            log.info("application %d: instance %s took over", app.id, pending.id)
        elif WorkloadState(pending.state) in TERMINAL_STATES:
            tail = instances.output_tail(self.runner, pending)
            db.execute(
                update(Application)
                .where(Application.id == app.id, Application.next_workload_id == pending.id)
                .values(
                    next_workload_id=None,
                    status_message=f"the restart failed ({pending.reason}); "
                    "the previous instance keeps serving"[:1000],
                    last_output=tail,
                )
            )
            db.commit()
            db.refresh(app)

    def _next_serving(
        self, db: Session, app: Application, ended: Workload | None, now: dt.datetime
    ) -> Workload | None:
        """The serving instance is gone: note a crash (once: ``restart_at`` is set then),
        then promote the replacement or, once the back-off allows, queue a new instance. The
        ended instance stays the application's ``workload_id`` meanwhile: its log and
        timeline are what the application's page shows."""
        if ended is not None and app.restart_at is None:
            self._crashed(db, app, ended, now)
        pending = apps.next_instance(db, app)
        if pending is not None and WorkloadState(pending.state) not in TERMINAL_STATES:
            db.execute(
                update(Application)
                .where(Application.id == app.id, Application.next_workload_id == pending.id)
                .values(workload_id=pending.id, next_workload_id=None, restart_at=None)
            )
            db.commit()
            db.refresh(app)
            return pending if app.workload_id == pending.id else None
        if app.restart_at is not None and now < app.restart_at:
            return None
        instance = apps.queue_instance(db, app, replacing=False)
        app.restart_at = None
        db.commit()
        return instance

    def _crashed(self, db: Session, app: Application, instance: Workload, now: dt.datetime) -> None:
        """Record that the serving ``instance`` ended although the application should run,
        and when the next one may start (committed)."""
        if instance.stop_cause == StopCause.REQUESTED.value:
            app.restart_at = now  # stopped on purpose (a race with a start): no back-off
        else:
            ran = 0.0
            if instance.started_at and instance.ended_at:
                ran = (instance.ended_at - instance.started_at).total_seconds()
            app.crashes = 1 if ran >= STABLE_SECONDS else app.crashes + 1
            app.restart_at = now + dt.timedelta(seconds=backoff(app.crashes))
            app.status_message = (instance.reason or "it ended")[:1000]
            app.last_output = instances.output_tail(self.runner, instance)
            log.info(
                "application %d: instance %s ended (%s); crash %d, next start in %.0f s",
                app.id,
                instance.id,
                instance.reason,
                app.crashes,
                backoff(app.crashes),
            )
        db.commit()

    def _advance(
        self,
        db: Session,
        project: Project,
        app: Application,
        instance: Workload,
        now: dt.datetime,
        *,
        replacing: bool,
    ) -> Look:
        """Start a pending instance (quota allowing), or look at a live one."""
        state = WorkloadState(instance.state)
        if state in TERMINAL_STATES:
            return Look.ENDED
        if state in PENDING_STATES:
            if not replacing and self._must_wait(db, project, instance):
                return Look.STARTING
            instances.launch(db, self.runner, project, app, instance)
            state = WorkloadState(instance.state)
            if state in TERMINAL_STATES:
                return Look.ENDED
        look = instances.observe(db, self.runner, instance, now, self.start_seconds)
        if look is Look.READY and not replacing:
            app.crashes, app.restart_at, app.status_message = 0, None, ""
            db.commit()
        if look is Look.STOPPING:
            self.stop_later(apps.runner_id(instance), instance.reason or "stopped")
        return look

    def _must_wait(self, db: Session, project: Project, instance: Workload) -> bool:
        gone = "the user who created the application is gone"
        return served.must_wait(db, self.settings, project, instance, gone)

    # ---- stopping --------------------------------------------------------------------------

    def _sweep(self, db: Session, now: dt.datetime) -> None:
        """Stop live instances no application points at: replaced ones once drained, and
        those of deleted applications (the web tier stops them itself when it can)."""
        referenced = select(Application.workload_id).where(Application.workload_id.is_not(None))
        pending = select(Application.next_workload_id).where(
            Application.next_workload_id.is_not(None)
        )
        live = [s.value for s in PENDING_STATES | LIVE_STATES]
        query = select(Workload).where(
            Workload.kind == apps.KIND,
            Workload.state.in_(live),
            Workload.id.not_in(referenced),
            Workload.id.not_in(pending),
        )
        for instance in list(db.scalars(query)):
            if instance.expires_at is not None and instance.expires_at > now:
                continue  # still draining
            if WorkloadState(instance.state) == WorkloadState.STOPPING:
                self.stop_later(apps.runner_id(instance), instance.reason or "stopped")
                instances.observe(db, self.runner, instance, now, self.start_seconds)
                continue
            reason = "replaced by a new instance" if instance.expires_at else "not needed any more"
            self._stop(db, instance, reason)

    def _wind_down(self, db: Session, app: Application, now: dt.datetime) -> None:
        for instance in (apps.next_instance(db, app), apps.current_instance(db, app)):
            if instance is None:
                continue
            state = WorkloadState(instance.state)
            if state in PENDING_STATES:
                apps.stop_pending(db, instance, app.status_message or "stopped")
                db.commit()
            elif state in (WorkloadState.STARTING, WorkloadState.RUNNING):
                self._stop(db, instance, app.status_message or "stopped")
            elif state == WorkloadState.STOPPING:
                self.stop_later(apps.runner_id(instance), instance.reason or "stopped")
                instances.observe(db, self.runner, instance, now, self.start_seconds)

    def _stop(self, db: Session, instance: Workload, reason: str) -> None:
        served.stop(db, instance, reason, self.stop_later)
