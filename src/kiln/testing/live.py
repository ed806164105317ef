"""A real Kiln web server on a free port, over HTTPS, in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from sqlalchemy import Engine

from kiln.app import create_app
from kiln.apps.listener import uvicorn_options
from kiln.pki.ca import CertificateAuthority, web_server_names
from kiln.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class LiveServer:
    url: str  # ends with "/"
    ca_file: Path
    settings: Settings


@contextmanager
def live_server(settings: Settings, engine: Engine) -> Iterator[LiveServer]:
    ca = CertificateAuthority(settings.pki_dir)
    ca.load_or_create()
    cert, key = ca.ensure_leaf("web-server", web_server_names(settings.domain))
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, engine),
        host="127.0.0.1",
        port=port,
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
        log_level="warning",
        lifespan="on",
        **uvicorn_options(),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the live Kiln server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(f"https://localhost:{port}/", ca.cert_path, settings)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
