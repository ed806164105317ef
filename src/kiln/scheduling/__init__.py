"""The pure scheduling rules that the domain and the runner share: cron slots, retries and
time limits, the workload state machine, the job graph. No database, HTTP or processes here;
this package imports nothing of Kiln's but its error types (``kiln.domain.errors``)."""
