"""The ``local`` runtime: bubblewrap sandboxes on this machine (see README.md)."""

from kiln.runtimes.local.runtime import DEFAULT_HOST_UID, LocalRuntime, NotRunning

__all__ = ["DEFAULT_HOST_UID", "LocalRuntime", "NotRunning"]
