"""The runner's own calls into its servicer, without the network.

The reconciler lives in the runner process beside ``RunnerServicer``; it uses the same
operations the web tier reaches over gRPC (start, status, stop), with the same validation and
the same errors, through this adapter instead of a TLS connection to itself (which would need
a certificate identity for "the runner calling the runner").
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NoReturn

import grpc

from kiln.rpc import runner_pb2 as pb
from kiln.runner.client import STOP_GRACE_SECONDS, error_for
from kiln.runner.service import RunnerServicer


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _Context:
    """The part of ``grpc.ServicerContext`` the unary methods use."""

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise _Aborted(code, details)

    def is_active(self) -> bool:
        return True


class InProcessRunner:
    """``RunnerClient``'s start/status/stop/logs, served by a servicer in this process."""

    def __init__(self, servicer: RunnerServicer) -> None:
        self.servicer = servicer

    def _call(self, method: str, request: Any, what: str) -> Any:
        try:
            return getattr(self.servicer, method)(request, _Context())
        except _Aborted as exc:
            raise error_for(exc.code, exc.details, what) from None

    def start(self, spec: pb.WorkloadSpec) -> pb.WorkloadStatus:
        status: pb.WorkloadStatus = self._call(
            "StartWorkload", pb.StartWorkloadRequest(spec=spec), "could not start the workload"
        )
        return status

    def status(self, workload_id: str) -> pb.WorkloadStatus:
        status: pb.WorkloadStatus = self._call(
            "GetStatus", pb.GetStatusRequest(workload_id=workload_id), "no status"
        )
        return status

    def stop(self, workload_id: str, reason: str, grace: float | None = None) -> pb.WorkloadStatus:
        request = pb.StopWorkloadRequest(
            workload_id=workload_id,
            grace_seconds=math.ceil(grace or STOP_GRACE_SECONDS),
            reason=reason,
        )
        status: pb.WorkloadStatus = self._call("StopWorkload", request, "could not stop it")
        return status

    def logs(self, workload_id: str) -> Iterator[bytes]:
        """The workload's stored console output (what ``RunnerClient.logs`` reads without
        following): for the reasons that quote a workload's last lines."""
        request = pb.StreamLogsRequest(workload_id=workload_id, offset=0, follow=False)
        try:
            for chunk in self.servicer.StreamLogs(request, _Context()):
                yield chunk.data
        except _Aborted as exc:
            raise error_for(exc.code, exc.details, "no log") from None
