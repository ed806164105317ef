"""The runner's scheduling rules as pure functions: cron slots and catch-up (``cron``), the
workload state machine (``states``), job dependencies (``jobgraph``), retries and time limits
(``retry``). See README.md in this package for the contracts the runner loop relies on."""
