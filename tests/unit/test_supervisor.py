"""The supervisor restarts crashed services with back-off, logs it, and stops them all."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import pytest

from kiln.supervisor import MAX_BACKOFF, MIN_BACKOFF, ServiceSpec, Supervisor, next_backoff


def test_backoff_doubles_after_quick_crashes_and_resets_after_a_stable_run() -> None:
    assert next_backoff(1.0, uptime=0.5) == 2.0
    assert next_backoff(16.0, uptime=0.5) == MAX_BACKOFF
    assert next_backoff(MAX_BACKOFF, uptime=0.5) == MAX_BACKOFF
    assert next_backoff(8.0, uptime=120.0) == MIN_BACKOFF


def wait_for(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_a_crashed_service_is_restarted_and_logged_and_stop_ends_all(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "starts"
    crasher = (
        f"open({str(marker)!r}, 'a').write('x'); import time; time.sleep(0.3); raise SystemExit(3)"
    )
    steady = "import time; time.sleep(60)"
    supervisor = Supervisor(
        [
            ServiceSpec("crasher", [sys.executable, "-c", crasher]),
            ServiceSpec("steady", [sys.executable, "-c", steady]),
        ],
        grace=5,
    )
    caplog.set_level(logging.INFO, logger="kiln.supervisor")
    thread = threading.Thread(target=supervisor.run, kwargs={"install_signals": False})
    thread.start()
    try:
        wait_for(lambda: marker.exists() and len(marker.read_text()) >= 2)
        steady_pid = supervisor.pids()["steady"]
        assert supervisor.restarts()["crasher"] >= 1
        assert supervisor.restarts()["steady"] == 0
        assert "service crasher exited with code 3" in caplog.text
        assert "restarting crasher (restart #1)" in caplog.text
    finally:
        supervisor.stop()
        thread.join(timeout=15)
    assert not thread.is_alive()
    assert supervisor.pids() == {}
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(steady_pid, 0)


def test_a_service_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"open({str(tmp_path / 'ready')!r}, 'w').close(); time.sleep(60)"
    )
    supervisor = Supervisor([ServiceSpec("stubborn", [sys.executable, "-c", stubborn])], grace=0.5)
    thread = threading.Thread(target=supervisor.run, kwargs={"install_signals": False})
    thread.start()
    wait_for(lambda: (tmp_path / "ready").exists())
    started = time.monotonic()
    supervisor.stop()
    thread.join(timeout=10)
    assert not thread.is_alive() and supervisor.pids() == {}
    assert time.monotonic() - started < 5


def test_repeated_sigterm_stops_the_supervisor_process(tmp_path: Path) -> None:
    """Signals can arrive while the main loop is inside its own locking code; a handler that
    took a lock there would deadlock (it did, with a threading.Event)."""
    import signal
    import subprocess

    script = (
        "import sys; from kiln.supervisor import ServiceSpec, Supervisor; "
        f"open({str(tmp_path / 'ready')!r}, 'w').close(); "
        "Supervisor([ServiceSpec('sleeper', [sys.executable, '-c', 'import time; "
        "time.sleep(60)'])], grace=2).run()"
    )
    for _ in range(3):  # a burst of signals: the old Event-based handler hung ~1 time in 5
        (tmp_path / "ready").unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", script])
        wait_for(lambda: (tmp_path / "ready").exists())
        time.sleep(0.3)
        for _ in range(2000):
            proc.send_signal(signal.SIGTERM)
        # It must end, not hang. 0 normally; a signal that lands after run() returned, while
        # the interpreter exits, ends it by the default action (-15), which is just as good.
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
