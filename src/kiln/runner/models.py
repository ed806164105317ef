"""The reconciler's models phase (the *model keeper*): keep each model deployment's replicas
matching the deployment (``kiln.domain.model_deploys`` writes what is wanted).

A replica is a workload of kind ``replica`` (``kiln.domain.model_replicas``) that runs the
model server on the model build's own image: unpacked into the runner's runtime cache
(``kiln.runner.model_images``), started with the image's ``/home/cdsw`` as its home
(``image_home``: the code that was built, never the live project) and probed on
``/_kiln/ready`` until it answers 200. Each pass looks at every deployment that is
``deploying``, ``serving`` or ``draining``, or still has a replica that has not ended:

- **deploying**: one replica per slot (0 .. replicas-1) is started (quota allowing) and
  watched. Once every slot's replica is ready, the model switches to this deployment (a
  compare-and-set on ``models.serving_deployment_id``, so a stop or a newer deploy the web
  tier wrote meanwhile wins) and the deployment it replaces is marked ``draining``. A replica
  that ends before it was ever ready (its import failed, it exited, it did not get ready in
  time) fails the deployment with its last output as the reason: the serving one is untouched.
- **serving**: a replica that ends is restarted in its slot after a back-off (the
  applications' one: 1 s doubling to 5 min; ``restarts`` + 1); a scale up adds slots and a
  scale down drains the slots above the count.
- **draining** (replaced, stopped or its model deleted): each replica is taken out of the
  route at once and stopped ``DRAIN_SECONDS`` later, when no router can still hold it in a
  cached route; the model server then finishes its calls in flight on SIGTERM and exits.
  Once none is left the deployment is ``stopped``.
- **stopped / failed**: replicas still live never served (or failed): stopped at once.

A deleted model (``deleted_at``) is removed, rows and all, once none of its replicas lives.

Quota: a replica waits for room in its deploying user's (and team's) quota like a session,
except the replicas of a redeploy: they stand in for the serving ones that stop once they are
ready (an application's restart is treated the same way).
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from kiln.db.build_models import Build
from kiln.db.model_models import Model, ModelBuild, ModelDeployment, ModelReplica
from kiln.db.models import Project
from kiln.db.workload_models import Workload
from kiln.domain import app_instances as instances
from kiln.domain import model_replicas as replicas
from kiln.domain import model_stats
from kiln.domain.app_instances import Look
from kiln.domain.control import WorkloadControl
from kiln.domain.model_deploys import DEPLOYING, DRAINING, FAILED, SERVING, STOPPED
from kiln.domain.models import live_replicas
from kiln.domain.sessions import add_event
from kiln.domain.transitions import move
from kiln.rpc import runner_pb2 as pb
from kiln.runner import served
from kiln.runner.applications import STABLE_SECONDS, backoff
from kiln.runner.model_images import ImageUnavailable, ModelImages
from kiln.runner.served import StopLater
from kiln.scheduling.states import (
    LIVE_STATES,
    PENDING_STATES,
    TERMINAL_STATES,
    Event,
    IllegalTransition,
    WorkloadState,
)
from kiln.settings import Settings

log = logging.getLogger("kiln.runner.models")

# A replica leaves the route at once but runs this long before it is stopped: the router
# re-reads routes every second and trusts a call's authorization for two, so no call can be
# sent to it after this.
DRAIN_SECONDS = 3.0
EXIT_SECONDS = 5.0
PRUNE_SECONDS = 600.0  # how often old request statistics are deleted
LIVE = [s.value for s in PENDING_STATES | LIVE_STATES]
WAITING_FOR_IMAGE = "waiting for the model's image to be unpacked on the runner"

Slot = tuple[ModelReplica, Workload]


class ModelKeeper:
    def __init__(
        self,
        runner: WorkloadControl,
        settings: Settings,
        stop_later: StopLater,
        sessions: sessionmaker[Session],
    ) -> None:
        self.runner = runner
        self.settings = settings
        self.stop_later = stop_later
        self.images = ModelImages(settings, sessions)
        self._pruned_at: dt.datetime | None = None

    @property
    def start_seconds(self) -> float:
        return float(self.settings.models.replica_start_seconds)

    @property
    def drain_seconds(self) -> float:
        """How long a stopped replica's calls in flight may take to finish: as long as the
        router waits for an answer (a longer call has already failed for its caller)."""
        return float(self.settings.models.call_timeout_seconds)

    @property
    def grace(self) -> float:
        """SIGTERM to SIGKILL: the drain, and a little for the server to exit after it."""
        return self.drain_seconds + EXIT_SECONDS

    def close(self) -> None:
        self.images.close()

    def pass_over(self, db: Session, now: dt.datetime) -> None:
        """One look at every deployment that wants replicas or still has a live one, then
        at deleted models whose replicas are all gone."""
        busy = (
            select(ModelReplica.deployment_id)
            .join(Workload, Workload.id == ModelReplica.workload_id)
            .where(Workload.state.in_(LIVE))
        )
        query = (
            select(ModelDeployment.id)
            .where(
                ModelDeployment.state.in_((DEPLOYING, SERVING, DRAINING))
                | ModelDeployment.id.in_(busy)
            )
            .order_by(ModelDeployment.id)
        )
        for deployment_id in list(db.scalars(query)):
            deployment = db.get(ModelDeployment, deployment_id)
            if deployment is None:
                continue
            try:
                self.reconcile(db, deployment, now)
            except IllegalTransition:
                db.rollback()  # the web tier moved a replica first: the next pass looks again
            except Exception:
                db.rollback()
                log.exception("model deployment %d: reconciling failed", deployment_id)
        self._remove_deleted(db)
        self._prune_stats(db, now)

    def _prune_stats(self, db: Session, now: dt.datetime) -> None:
        """The router's request statistics older than ``KILN_MODELS_STATS_RETENTION_DAYS``
        go, at most once every ``PRUNE_SECONDS`` (a pass runs every few seconds)."""
        if self._pruned_at is not None and (now - self._pruned_at).total_seconds() < PRUNE_SECONDS:
            return
        self._pruned_at = now
        model_stats.prune(db, now, self.settings.models.stats_retention_days)
        db.commit()

    # ---- one deployment --------------------------------------------------------------------

    def reconcile(self, db: Session, deployment: ModelDeployment, now: dt.datetime) -> None:
        model = db.get(Model, deployment.model_id)
        project = db.get(Project, model.project_id) if model is not None else None
        if model is None or project is None:
            return
        state = deployment.state
        if model.deleted_at is not None and state in (DEPLOYING, SERVING):
            state = DRAINING  # the web tier marks them so; a deploy racing the delete too
        if state == DEPLOYING:
            if self._keep_slots(db, project, model, deployment, now) and self._all_ready(
                db, deployment
            ):
                self._switch(db, model, deployment, now)
        elif state == SERVING:
            self._keep_slots(db, project, model, deployment, now)
        else:
            self._wind_down(db, deployment, now, drain=state == DRAINING)

    def _keep_slots(
        self,
        db: Session,
        project: Project,
        model: Model,
        deployment: ModelDeployment,
        now: dt.datetime,
    ) -> bool:
        """Start, watch and restart one replica per slot; drain the slots above the count.
        False when the deployment failed (a replica of a deploying one never got ready).
        While a replica waits (for quota, for its image) the deployment says so."""
        waiting = ""
        every = replicas.replicas_of(db, deployment.id)
        current = {replica.slot: (replica, w) for replica, w in every}
        for replica, workload in every:
            # Slots above the count, and any replica that is not its slot's newest (two
            # runners racing to fill a slot): out of the route and stopped.
            if replica.slot >= deployment.replicas or current[replica.slot][1] is not workload:
                self._drain(db, replica, workload, now)
        for slot in range(deployment.replicas):
            if slot not in current:
                replicas.queue_replica(db, deployment, project.id, slot, restarts=0)
                db.commit()
                current = self._current(db, deployment.id)
            replica, workload = current[slot]
            if WorkloadState(workload.state) in TERMINAL_STATES:
                if not self._ended(db, deployment, replica, workload, now):
                    return False
                continue
            look = self._advance(db, project, model, deployment, workload, now)
            if look is Look.READY:
                self._mark_ready(db, replica, ready=True, now=now)
            elif look is Look.ENDED:
                self._mark_ready(db, replica, ready=False, now=now)
                if not self._ended(db, deployment, replica, workload, now):
                    return False
            if workload.state == WorkloadState.WAITING.value and not waiting:
                waiting = workload.reason
        if deployment.reason != waiting:
            db.execute(  # never over a reason the web tier wrote with a stop
                update(ModelDeployment)
                .where(
                    ModelDeployment.id == deployment.id, ModelDeployment.state == deployment.state
                )
                .values(reason=waiting[:1000])
                .execution_options(synchronize_session=False)
            )
            db.commit()
            db.refresh(deployment)
        return True

    def _current(self, db: Session, deployment_id: int) -> dict[int, Slot]:
        """The newest replica of each slot (the ones before it ended)."""
        return {
            replica.slot: (replica, w) for replica, w in replicas.replicas_of(db, deployment_id)
        }

    def _ended(
        self,
        db: Session,
        deployment: ModelDeployment,
        replica: ModelReplica,
        workload: Workload,
        now: dt.datetime,
    ) -> bool:
        """A slot's replica ended. Before it was ever ready in a deploying deployment: the
        deployment fails (False). Otherwise a new replica takes the slot after the back-off."""
        if replica.ready:
            self._mark_ready(db, replica, ready=False, now=now)
        if deployment.state == DEPLOYING and replica.ready_at is None:
            self._fail(db, deployment, workload, now)
            return False
        ended = workload.ended_at or now
        ran = 0.0
        if workload.started_at is not None:
            ran = (ended - workload.started_at).total_seconds()
        delay = backoff(1 if ran >= STABLE_SECONDS else replica.restarts + 1)
        if now < ended + dt.timedelta(seconds=delay):
            return True
        log.info(
            "model deployment %d: replica %s in slot %d ended (%s); restart %d",
            deployment.id,
            workload.id,
            replica.slot,
            workload.reason,
            replica.restarts + 1,
        )
        replicas.queue_replica(
            db, deployment, workload.project_id, replica.slot, restarts=replica.restarts + 1
        )
        db.commit()
        return True

    def _fail(
        self, db: Session, deployment: ModelDeployment, workload: Workload, now: dt.datetime
    ) -> None:
        """The deployment cannot serve: say why with the replica's last output, and stop its
        other replicas (the serving deployment, if any, keeps serving)."""
        tail = instances.output_tail(self.runner, workload)
        why = f"a replica ended before it was ready ({workload.reason or 'it ended'})"
        reason = f"{why}; its last output:\n{tail}" if tail else why
        if len(reason) > 1000:  # the end of a traceback says most
            reason = f"{why}; its last output:\n…{tail[-(990 - len(why)) :]}"
        result = db.execute(
            update(ModelDeployment)
            .where(ModelDeployment.id == deployment.id, ModelDeployment.state == DEPLOYING)
            .values(state=FAILED, reason=reason[:1000], ended_at=workload.ended_at or now)
            .execution_options(synchronize_session=False)
        )
        db.commit()
        db.refresh(deployment)
        if result.rowcount:  # type: ignore[attr-defined]
            log.info("model deployment %d failed: %s", deployment.id, why)
            self._wind_down(db, deployment, now, drain=False)

    def _all_ready(self, db: Session, deployment: ModelDeployment) -> bool:
        current = self._current(db, deployment.id)
        return all(
            slot in current
            and current[slot][0].ready
            and current[slot][1].state == WorkloadState.RUNNING.value
            for slot in range(deployment.replicas)
        )

    def _mark_ready(
        self, db: Session, replica: ModelReplica, *, ready: bool, now: dt.datetime
    ) -> None:
        replica.ready = ready
        if ready and replica.ready_at is None:
            replica.ready_at = now
        db.commit()

    def _switch(
        self, db: Session, model: Model, deployment: ModelDeployment, now: dt.datetime
    ) -> None:
        """Every replica is ready: calls go to this deployment from now on. Both rows are
        compare-and-sets, so a stop or a newer deploy written meanwhile wins (nothing
        switches; the next pass stops these replicas)."""
        old_id = model.serving_deployment_id
        moved = db.execute(
            update(ModelDeployment)
            .where(ModelDeployment.id == deployment.id, ModelDeployment.state == DEPLOYING)
            .values(state=SERVING, serving_at=now, reason="")
            .execution_options(synchronize_session=False)
        )
        same = (
            Model.serving_deployment_id.is_(None)
            if old_id is None
            else Model.serving_deployment_id == old_id
        )
        switched = db.execute(
            update(Model)
            .where(Model.id == model.id, same, Model.deleted_at.is_(None))
            .values(serving_deployment_id=deployment.id)
            .execution_options(synchronize_session=False)
        )
        if not moved.rowcount or not switched.rowcount:  # type: ignore[attr-defined]
            db.rollback()
            return
        if old_id is not None and old_id != deployment.id:
            db.execute(
                update(ModelDeployment)
                .where(ModelDeployment.id == old_id, ModelDeployment.state == SERVING)
                .values(state=DRAINING, reason=f"replaced by deployment {deployment.number}")
                .execution_options(synchronize_session=False)
            )
        db.commit()
        db.refresh(deployment)
        db.refresh(model)
        log.info("model %d: deployment %d serves", model.id, deployment.number)

    # ---- starting and watching one replica -------------------------------------------------

    def _advance(
        self,
        db: Session,
        project: Project,
        model: Model,
        deployment: ModelDeployment,
        workload: Workload,
        now: dt.datetime,
    ) -> Look:
        """Start a pending replica (quota and image allowing), or look at a live one."""
        state = WorkloadState(workload.state)
        if state in PENDING_STATES:
            redeploy = deployment.state == DEPLOYING and model.serving_deployment_id is not None
            gone = "the user who deployed the model is gone"
            if not redeploy and served.must_wait(db, self.settings, project, workload, gone):
                return Look.STARTING
            spec = self._spec(db, project, model, deployment, workload)
            if spec is None:
                return Look.ENDED if workload.ended_at else Look.STARTING
            instances.start_workload(db, self.runner, workload, spec)
            if WorkloadState(workload.state) in TERMINAL_STATES:
                return Look.ENDED
        look = instances.observe(
            db, self.runner, workload, now, self.start_seconds, probe=replicas.is_ready
        )
        if look is Look.STOPPING:
            self.stop_later(replicas.runner_id(workload), workload.reason or "stopped", self.grace)
        return look

    def _spec(
        self,
        db: Session,
        project: Project,
        model: Model,
        deployment: ModelDeployment,
        workload: Workload,
    ) -> pb.WorkloadSpec | None:
        """What the runner starts for ``workload``; None while its image is being unpacked
        (the replica waits, saying so) or when it cannot be (the replica failed)."""
        version = db.get(ModelBuild, deployment.model_build_id)
        build = db.get(Build, version.build_id) if version is not None else None
        if version is None or build is None:
            instances.fail(db, workload, "the model build it runs was deleted")
            return None
        image = self._image(db, build, workload)
        if image is None:
            return None
        runtime, image_env = image
        runtime.id = f"{model.name}-{deployment.number}"
        command = replicas.command(model, version, self.drain_seconds)
        workload.command = list(command)
        env = {**image_env, **replicas.replica_env(db, project, model, deployment, workload)}
        return pb.WorkloadSpec(
            workload_id=replicas.runner_id(workload),
            kind=pb.WORKLOAD_KIND_MODEL_REPLICA,
            project_id=project.id,
            user_id=workload.user_id or 0,
            runtime=runtime,
            image_home=True,
            command=list(command),
            port=replicas.PORT,
            env=env,
            resources=pb.Resources(
                cpu=workload.cpu_millis / 1000, memory_bytes=workload.memory_bytes
            ),
            labels={
                "model": str(model.id),
                "deployment": str(deployment.id),
                "project": str(project.id),
            },
        )

    def _image(
        self, db: Session, build: Build, workload: Workload
    ) -> tuple[pb.RuntimeRef, dict[str, str]] | None:
        """The replica's image and the bottom of its environment; None while it is being
        unpacked (the replica waits, saying so) or when it cannot be (the replica failed)."""
        if self.settings.runner.runtime == "kubernetes":
            if not build.image_digest or not build.repository:
                instances.fail(db, workload, f"build {build.number} recorded no image")
                return None
            # The cluster pulls it from the registry itself (the container runtime applies
            # the image's Env): nothing to unpack here.
            return pb.RuntimeRef(image=f"{build.repository}@{build.image_digest}"), {}
        try:
            image = self.images.get(build)
        except ImageUnavailable as exc:
            instances.fail(db, workload, f"its image cannot be used: {exc}")
            return None
        if image is None:
            if workload.reason != WAITING_FOR_IMAGE:
                name = replicas.replica_name(workload)
                move(db, workload, Event.BLOCK, name, reason=WAITING_FOR_IMAGE)
                add_event(db, workload, WAITING_FOR_IMAGE)
                db.commit()
            return None
        rootfs = replicas.resolved(image.rootfs)
        return pb.RuntimeRef(image=image.digest, rootfs=rootfs), image.env

    # ---- stopping --------------------------------------------------------------------------

    def _drain(
        self, db: Session, replica: ModelReplica, workload: Workload, now: dt.datetime
    ) -> None:
        """Out of the route now, stopped once no router can still send it a call."""
        state = WorkloadState(workload.state)
        if state in TERMINAL_STATES:
            return
        if state in PENDING_STATES:
            served.stop(db, workload, "not needed any more", self.stop_later, self.grace)
            return
        if state == WorkloadState.STOPPING:
            self.stop_later(replicas.runner_id(workload), workload.reason or "stopped", self.grace)
            instances.observe(db, self.runner, workload, now, self.start_seconds)
            return
        if workload.expires_at is None:
            replica.ready = False
            workload.expires_at = now + dt.timedelta(seconds=DRAIN_SECONDS)
            add_event(db, workload, f"out of the route: stops in {DRAIN_SECONDS:.0f} s")
            db.commit()
            return
        if workload.expires_at <= now:
            served.stop(db, workload, "drained", self.stop_later, self.grace)
        else:
            instances.observe(db, self.runner, workload, now, self.start_seconds)

    def _wind_down(
        self, db: Session, deployment: ModelDeployment, now: dt.datetime, *, drain: bool
    ) -> None:
        """Stop every replica: after draining when the deployment served calls (``drain``),
        at once otherwise. A draining deployment with none left is stopped."""
        left = False
        for replica, workload in replicas.replicas_of(db, deployment.id):
            if WorkloadState(workload.state) in TERMINAL_STATES:
                continue
            left = True
            if drain or WorkloadState(workload.state) == WorkloadState.STOPPING:
                self._drain(db, replica, workload, now)
            else:
                replica.ready = False
                served.stop(
                    db, workload, deployment.reason or "stopped", self.stop_later, self.grace
                )
        if not left and deployment.state == DRAINING:
            db.execute(
                update(ModelDeployment)
                .where(ModelDeployment.id == deployment.id, ModelDeployment.state == DRAINING)
                .values(state=STOPPED, ended_at=now)
                .execution_options(synchronize_session=False)
            )
            db.commit()

    def _remove_deleted(self, db: Session) -> None:
        """Deleted models go, rows and all, once their last replica ended."""
        for model in list(db.scalars(select(Model).where(Model.deleted_at.is_not(None)))):
            if live_replicas(db, model):
                continue
            db.delete(model)
            db.commit()
            log.info("model %d (%s) deleted: its replicas have stopped", model.id, model.name)
