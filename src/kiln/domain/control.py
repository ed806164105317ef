"""What domain code needs from a runner, as a protocol the runner side implements.

The domain starts, watches and stops workloads through this seam and never imports
``kiln.runner``: the web tier passes its gRPC ``RunnerClient``, the runner process its
``InProcessRunner``. Keeping the seam here is what lets ``kiln.runner`` import the domain
without the domain importing it back (``tests/unit/test_layout.py`` checks the direction).
"""

from __future__ import annotations

from typing import Protocol

from kiln.rpc import runner_pb2 as pb


class WorkloadControl(Protocol):
    """Start, look at and stop workloads (a ``RunnerClient`` or an ``InProcessRunner``)."""

    def start(self, spec: pb.WorkloadSpec) -> pb.WorkloadStatus: ...

    def status(self, workload_id: str) -> pb.WorkloadStatus: ...

    def stop(self, workload_id: str, reason: str, grace: float | None = None) -> pb.WorkloadStatus:
        """Stop and wait until it ended: SIGTERM, then SIGKILL after ``grace`` seconds (the
        runner client's default when None)."""
