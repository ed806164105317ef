"""Webhook notifications of job runs: a POST with a JSON body, retried, never to Kiln itself.

A webhook URL is user input that the runner fetches: a server-side request a user controls.
So, at each delivery, the host name is resolved once and every address is checked, and the
connection goes to the checked address (the name is kept for ``Host`` and TLS), so a DNS
answer that changes between check and connect (rebinding) cannot redirect it. Refused:

* loopback, link-local (cloud metadata lives there), multicast, unspecified and reserved
  addresses, and every address of this host: Kiln's own listeners (web, runner, database)
  are on them;
* private ranges (10/8, 172.16/12, 192.168/16, fc00::/7).

An admin may allow networks with ``KILN_RUNNER_WEBHOOK_ALLOWED_NETWORKS`` (an internal chat
server, say); even then Kiln's own ports on this host (``blocked_ports``: web, runner,
database) stay refused.

Redirects are not followed. Failures are retried with backoff, then logged.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx

from kiln import __version__
from kiln.runner.jobruns import Notice

log = logging.getLogger("kiln.runner.webhooks")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
TIMEOUT = 10.0
DEFAULT_BACKOFF = (1.0, 5.0, 25.0)  # waits before the 2nd, 3rd and 4th attempts


class Refused(Exception):
    """The URL points somewhere a webhook may not go."""


def host_addresses() -> set[Address]:
    """This host's own addresses (every interface), as far as the resolver tells."""
    found: set[Address] = set()
    names = {socket.gethostname(), socket.getfqdn(), "localhost"}
    for name in names:
        try:
            for info in socket.getaddrinfo(name, None):
                found.add(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
        except OSError:
            continue
    try:  # Linux: the addresses of every interface
        with open("/proc/net/fib_trie") as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            if "/32 host LOCAL" in line and i > 0:
                found.add(ipaddress.ip_address(lines[i - 1].split()[-1]))
    except (OSError, ValueError):
        pass
    return found


@dataclass
class Policy:
    allowed: Sequence[Network] = ()
    blocked_ports: frozenset[int] = frozenset()
    own_addresses: set[Address] = field(default_factory=host_addresses)

    def check(self, address: Address, port: int) -> None:
        allowed = any(address in net for net in self.allowed)
        if allowed:
            if port in self.blocked_ports and (
                address.is_loopback or address in self.own_addresses
            ):
                raise Refused(f"{address}:{port} is one of Kiln's own listeners")
            return
        if address in self.own_addresses or address.is_loopback:
            raise Refused(f"{address} is this host")
        if (
            address.is_link_local
            or address.is_multicast
            or address.is_unspecified
            or address.is_reserved
        ):
            raise Refused(f"{address} is not a public address")
        if address.is_private:
            raise Refused(
                f"{address} is a private address (an admin may allow its network with "
                "KILN_RUNNER_WEBHOOK_ALLOWED_NETWORKS)"
            )


def resolve(host: str, port: int) -> list[Address]:
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise Refused(f"cannot resolve {host!r}: {exc}") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def post(url: str, body: bytes, policy: Policy) -> int:
    """One delivery attempt; the HTTP status, or ``Refused`` / ``httpx.HTTPError``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = resolve(host, port)
    for address in addresses:
        policy.check(address, port)
    pinned = f"[{addresses[0]}]" if addresses[0].version == 6 else str(addresses[0])
    target = urlunsplit((parts.scheme, f"{pinned}:{port}", parts.path or "/", parts.query, ""))
    headers = {
        "Host": parts.netloc.rsplit("@", 1)[-1],
        "Content-Type": "application/json",
        "User-Agent": f"kiln-webhooks/{__version__}",
    }
    with httpx.Client(timeout=TIMEOUT, follow_redirects=False) as client:
        response = client.post(
            target, content=body, headers=headers, extensions={"sni_hostname": host}
        )
    return response.status_code


class WebhookSender:
    """Delivers notices in the background; each gets ``1 + len(backoff)`` attempts."""

    def __init__(
        self,
        policy: Policy,
        backoff: Iterable[float] = DEFAULT_BACKOFF,
    ) -> None:
        self.policy = policy
        self.backoff = tuple(backoff)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kiln-webhook")
        self._closing = threading.Event()
        # (url, outcome) of the latest deliveries, newest last: bounded, for tests/debugging.
        self.delivered: deque[tuple[str, str]] = deque(maxlen=100)

    def __call__(self, notice: Notice) -> None:
        self._pool.submit(self._deliver, notice)

    def _deliver(self, notice: Notice) -> None:
        body = json.dumps(notice.payload).encode()
        result = "failed"
        for attempt, wait in enumerate((0.0, *self.backoff), start=1):
            if wait and self._closing.wait(wait):
                break
            try:
                status = post(notice.url, body, self.policy)
            except Refused as exc:
                log.warning("webhook to %s refused: %s", notice.url, exc)
                result = f"refused: {exc}"
                break
            except httpx.HTTPError as exc:
                log.warning("webhook to %s failed (attempt %d): %s", notice.url, attempt, exc)
                continue
            if 200 <= status < 300:
                result = "delivered"
                break
            log.warning("webhook to %s answered %d (attempt %d)", notice.url, status, attempt)
            result = f"HTTP {status}"
        self.delivered.append((notice.url, result))

    def close(self) -> None:
        self._closing.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
