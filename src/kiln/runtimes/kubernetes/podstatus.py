"""What a pod's status says, in Kiln's words. Pure functions over the API's JSON.

- ``ending(pod)``: has the workload's container ended, with which exit code and reason;
- ``start_failure(pod, autoscaling)``: a start that cannot succeed, said at once (the
  scheduler's reason, an image pull error, a crash loop, a configuration error) instead of
  waiting for a timeout;
- ``steps(pod, events)``: Kubernetes' own steps for the session timeline (scheduled, image
  pulled, container started, ready), each with the time the cluster recorded.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kiln.runtimes.base import ExitReason

Pod = dict[str, Any]

# Waiting reasons after which the container will not start without someone acting.
IMAGE_FAILURES = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                            "ErrImageNeverPull", "RegistryUnavailable"})  # fmt: skip
CONFIG_FAILURES = frozenset({"CreateContainerConfigError", "CreateContainerError",
                             "RunContainerError", "PreCreateHookError"})  # fmt: skip
CRASH_LOOP = "CrashLoopBackOff"


@dataclass(frozen=True)
class Ending:
    exit_code: int
    reason: ExitReason
    message: str
    finished_at: float | None


@dataclass(frozen=True)
class StartFailure:
    """Why a start cannot succeed: ``kind`` for machines, ``message`` for the user."""

    kind: str  # unschedulable | image | crash-loop | config | quota
    message: str


def timestamp(text: str | None) -> float | None:
    """An RFC 3339 time of the API (``2026-01-02T03:04:05Z``) as Unix time."""
    if not text:
        return None
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _container(pod: Pod) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return statuses[0] if statuses else {}


def _condition(pod: Pod, kind: str) -> dict[str, Any]:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return dict(condition)
    return {}


def started_at(pod: Pod) -> float | None:
    running = (_container(pod).get("state") or {}).get("running") or {}
    terminated = (_container(pod).get("state") or {}).get("terminated") or {}
    return timestamp(running.get("startedAt") or terminated.get("startedAt"))


def is_running(pod: Pod) -> bool:
    """The container runs (started; it may not be *ready*: readiness is the caller's)."""
    return "running" in (_container(pod).get("state") or {})


def ending(pod: Pod) -> Ending | None:
    """How the container ended, or None while it has not."""
    state = _container(pod).get("state") or {}
    terminated = state.get("terminated")
    phase = (pod.get("status") or {}).get("phase")
    if terminated is None:
        if phase in ("Succeeded", "Failed"):  # evicted or failed before its container ran
            message = (pod.get("status") or {}).get("message") or f"the pod {phase.lower()}"
            return Ending(255, ExitReason.LOST, message, None)
        return None
    code = int(terminated.get("exitCode", 255))
    kind = terminated.get("reason") or ""
    reason = ExitReason.OUT_OF_MEMORY if kind == "OOMKilled" else ExitReason.EXITED
    message = terminated.get("message") or (kind if kind not in ("Completed", "Error") else "")
    return Ending(code, reason, message, timestamp(terminated.get("finishedAt")))


def start_failure(pod: Pod, autoscaling: bool = False) -> StartFailure | None:
    """A reason the pod will not start on its own, or None while it may still start.

    Unschedulable pods wait while a cluster autoscaler may add a node for them (the
    scheduler says ``Insufficient cpu``/``memory``); what no new node can fix (a node
    selector nothing matches, a taint nothing tolerates without autoscaling, a claim that
    is not bound) fails at once with the scheduler's own words.
    """
    waiting = (_container(pod).get("state") or {}).get("waiting") or {}
    reason, detail = waiting.get("reason") or "", waiting.get("message") or ""
    if reason in IMAGE_FAILURES:
        image = _container(pod).get("image") or ""
        return StartFailure("image", f"cannot pull the runtime image {image}: {detail or reason}")
    if reason == CRASH_LOOP:
        return StartFailure("crash-loop", f"the workload keeps crashing: {detail or reason}")
    if reason in CONFIG_FAILURES:
        return StartFailure("config", f"the container cannot be created: {detail or reason}")
    scheduled = _condition(pod, "PodScheduled")
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        message = scheduled.get("message") or "no node can run it"
        if "unbound immediate PersistentVolumeClaims" in message:
            return None  # the claim is being bound: the scheduler tries again
        if (pod.get("status") or {}).get("nominatedNodeName"):
            return None  # lower-priority pods (headroom placeholders) are making room
        if autoscaling and "Insufficient" in message:
            return None  # the cluster autoscaler's cue: it adds a node for this pod
        return StartFailure("unschedulable", f"no node can run it: {message}")
    return None


def quota_failure(message: str) -> StartFailure | None:
    """The API server's refusal of a pod over the namespace's ResourceQuota."""
    if "exceeded quota" in message:
        return StartFailure("quota", f"over the user's quota: {message}")
    return None


def steps(pod: Pod, events: Iterable[dict[str, Any]] = ()) -> list[tuple[float, str]]:
    """The steps the cluster recorded, oldest first: scheduled (to which node), image
    pulled, container started, ready; plus warnings (image pulls failing, back-off)."""
    out: list[tuple[float, str]] = []
    scheduled = _condition(pod, "PodScheduled")
    node = (pod.get("spec") or {}).get("nodeName")
    at = timestamp(scheduled.get("lastTransitionTime"))
    if scheduled.get("status") == "True" and at is not None:
        out.append((at, f"scheduled on node {node}" if node else "scheduled"))
    elif scheduled.get("reason") == "Unschedulable" and at is not None:
        out.append((at, f"waiting for a node: {scheduled.get('message', '')}".rstrip(": ")))
    for event in events:
        at = timestamp(
            event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
        )
        reason = event.get("reason")
        if at is None:
            continue
        if reason == "Pulled":
            out.append((at, "image pulled"))
        elif reason == "Pulling":
            out.append((at, "pulling the image"))
        elif reason == "Started":
            out.append((at, "container started"))
        elif event.get("type") == "Warning" and reason not in ("FailedScheduling",):
            out.append((at, f"{reason}: {event.get('message', '')}"))
    begun = started_at(pod)
    if begun is not None and not any(text == "container started" for _, text in out):
        out.append((begun, "container started"))
    ready = _condition(pod, "Ready")
    at = timestamp(ready.get("lastTransitionTime"))
    if ready.get("status") == "True" and at is not None:
        out.append((at, "ready"))
    out.sort(key=lambda step: step[0])
    return out
