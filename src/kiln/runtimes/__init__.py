"""Workload runtimes: the ``WorkloadRuntime`` seam and its implementations (README.md)."""

from kiln.runtimes.base import (
    EgressRule,
    Endpoint,
    ExecProcess,
    ExitReason,
    NetworkPolicy,
    StartFailed,
    WorkloadExists,
    WorkloadNotFound,
    WorkloadRuntime,
    WorkloadRuntimeError,
    WorkloadSpec,
    WorkloadStatus,
    register_runtime,
    runtime_class,
    runtime_names,
)

__all__ = [
    "EgressRule",
    "Endpoint",
    "ExecProcess",
    "ExitReason",
    "NetworkPolicy",
    "StartFailed",
    "WorkloadExists",
    "WorkloadNotFound",
    "WorkloadRuntime",
    "WorkloadRuntimeError",
    "WorkloadSpec",
    "WorkloadStatus",
    "register_runtime",
    "runtime_class",
    "runtime_names",
]
