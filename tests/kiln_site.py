"""``kiln up`` as a user runs it, for the tests that need the real process tree (the
supervisor with the web tier and the runner as children): start, read its output, find and
kill its services, stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from kiln.testing.base_image import base_cache_dir
from kiln.testing.live import free_port


class KilnSite:
    def __init__(
        self,
        tmp_path: Path,
        db_url: str | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = tmp_path / "data"
        self.port, self.runner_port, self.builder_port = free_port(), free_port(), free_port()
        full_env = dict(
            os.environ,
            KILN_ADMIN_PASSWORD="first-admin-password",
            KILN_RUNNER_PORT=str(self.runner_port),
            KILN_BUILDER_PORT=str(self.builder_port),
            # Kiln's base image from the cache `make test` fills: each site's builder would
            # otherwise make its own with mmdebstrap (minutes of CPU, cut off at stop()).
            KILN_BUILDER_BASE_CACHE_DIR=str(base_cache_dir()),
        )
        full_env.update(env or {})  # the caller's settings win, the cache directory too
        full_env.pop("KILN_DATABASE_URL", None)  # by default the embedded default: SQLite
        if db_url is not None:
            full_env["KILN_DATABASE_URL"] = db_url
        self.env = full_env
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kiln.cli.main",
                "up",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
                *args,
            ],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def explain(self, tail: int = 60) -> str:
        """What the site printed that says why a request failed: everything from the last
        unhandled error's traceback on (a 500 is logged so), else the last ``tail`` lines."""
        errors = [n for n, line in enumerate(self.lines) if "unhandled error on" in line]
        return "".join(self.lines[errors[-1] :] if errors else self.lines[-tail:])

    def wait_for_output(self, text: str, timeout: float = 90, after: int = 0) -> None:
        """Until a line printed after the first ``after`` lines contains ``text``."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines[after:]):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{text!r} not printed; output:\n{''.join(self.lines)}")
            time.sleep(0.1)

    @property
    def ca_file(self) -> str:
        return str(self.data_dir / "pki" / "ca.crt")

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(f"https://localhost:{self.port}{path}", verify=self.ca_file, **kwargs)  # type: ignore[arg-type]

    def child_pid(self, service: str) -> int:
        out = subprocess.run(
            ["pgrep", "-f", f"kiln.cli.main {service} --data-dir {self.data_dir}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert len(out) == 1, out
        return int(out[0])

    def kill9(self, service: str) -> int:
        """SIGKILL one service; returns once the supervisor restarts it, with the output
        line count at the kill (to wait for what the new process prints)."""
        pid = self.child_pid(service)
        mark = len(self.lines)
        os.kill(pid, signal.SIGKILL)
        self.wait_for_output(f"restarting {service}", after=mark)
        return mark

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
