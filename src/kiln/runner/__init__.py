"""The runner service: the reconciler that starts, watches and stops workloads, the cron
scheduler's loop, the log store and the gRPC service the web tier calls. The rules it follows
(cron slots, the state machine, retries, the job graph) are in :mod:`kiln.scheduling`; see
README.md in this package for the service's contracts."""
