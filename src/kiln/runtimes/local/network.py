"""Wiring a sandbox's private network namespace: slirp4netns, the nft egress policy, and the
inbound port forward.

The sandbox starts with only its own loopback. When it needs the network (egress allowed, an
``allow`` rule, or a declared port), ``slirp4netns`` gives it a user-mode NAT (10.0.2.100,
gateway 10.0.2.2 with ``--disable-host-loopback`` so the gateway does not lead to the host's
127.0.0.1 — unless the policy names ``host_ports``, which are then the only ports of the
gateway the ruleset lets through), and an nftables ruleset inside the namespace rejects
everything the policy does not allow — including every address of the host itself.
Inbound traffic comes only through a slirp port forward from ``127.0.0.1:<ephemeral>`` on the
host to each declared port. The forward arrives at the sandbox's own address (10.0.2.100), yet
web apps are told to listen on ``127.0.0.1:$CDSW_APP_PORT`` (CML's advice, and the default of
Flask, Gradio and TensorBoard): ``reach_loopback`` redirects the declared ports to the
sandbox's loopback, so an app answers whether it binds 127.0.0.1 or every address.

slirp4netns runs in its own session, so it survives a runner restart; it exits by itself when
the sandbox ends (its ``--exit-fd`` is a pipe whose only writer lives inside the sandbox).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from kiln.runtimes.base import StartFailed

NS_GET_USERNS = 0xB701  # ioctl on a namespace fd: the user namespace that owns it


def _owning_userns(pid1: int) -> int:
    """bubblewrap nests the sandbox's user namespace inside the one owning its network
    namespace; slirp4netns must join the owner, or it has no right to enter the netns."""
    net_fd = os.open(f"/proc/{pid1}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(net_fd, NS_GET_USERNS)
    finally:
        os.close(net_fd)


def start_slirp(
    pid1: int, api_socket: Path, log_path: Path, exit_fd: int, *, host_loopback: bool = False
) -> subprocess.Popen[bytes]:
    """Start slirp4netns for the namespace of ``pid1``; returns once the tap is up.

    ``host_loopback``: let the gateway (10.0.2.2) lead to the host's 127.0.0.1, for a policy
    with ``host_ports``. The nft ruleset then accepts exactly those ports at the gateway and
    rejects every other one, before any packet reaches slirp (``sandbox.egress_ruleset``)."""
    ready_r, ready_w = os.pipe()
    userns_fd = _owning_userns(pid1)
    loopback = [] if host_loopback else ["--disable-host-loopback"]
    try:
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                [
                    "slirp4netns",
                    "--configure",
                    "--mtu=65520",
                    *loopback,
                    "--enable-sandbox",
                    "--enable-seccomp",
                    f"--ready-fd={ready_w}",
                    f"--exit-fd={exit_fd}",
                    # Relative to its working directory: a socket path may have at most 107
                    # bytes, and a deep state directory (or a test's) would exceed that.
                    f"--api-socket={api_socket.name}",
                    f"--userns-path=/proc/self/fd/{userns_fd}",
                    str(pid1),
                    "tap0",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                pass_fds=(ready_w, exit_fd, userns_fd),
                cwd=api_socket.parent,
                start_new_session=True,
            )
        os.close(ready_w)
        ready_w = -1
        readable, _, _ = select.select([ready_r], [], [], 10)
        if not readable or os.read(ready_r, 1) != b"1":
            proc.kill()
            proc.wait()
            raise StartFailed(f"slirp4netns did not come up: {_tail(log_path)}")
        return proc
    finally:
        os.close(ready_r)
        os.close(userns_fd)
        if ready_w >= 0:
            os.close(ready_w)


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace").strip()
    except OSError:
        return "(no log)"


def apply_ruleset(pid1: int, ruleset: str) -> None:
    result = subprocess.run(
        ["nsenter", f"--net=/proc/{pid1}/ns/net", "nft", "-f", "-"],
        input=ruleset.encode(),
        capture_output=True,
        timeout=10,
        check=False,
    )
    if result.returncode != 0:
        raise StartFailed(
            "cannot load the egress firewall into the sandbox: "
            + result.stderr.decode(errors="replace").strip()
        )


def reach_loopback(pid1: int, ports: list[int]) -> None:
    """Inbound connections to the declared ``ports`` go to the sandbox's loopback: a DNAT
    rule on the tap interface, and ``route_localnet`` so the kernel routes packets for
    127.0.0.1 that arrive from outside. Both live in the sandbox's own network namespace,
    where the workload (no capabilities there) cannot change them."""
    listed = ", ".join(str(p) for p in sorted(set(ports)))
    ruleset = (
        "table ip kiln_inbound {\n"
        "  chain prerouting {\n"
        "    type nat hook prerouting priority dstnat; policy accept;\n"
        f'    iifname "tap0" tcp dport {{ {listed} }} dnat to 127.0.0.1\n'
        "  }\n"
        "}\n"
    )
    apply_ruleset(pid1, ruleset)
    # /proc/sys/net shows the network namespace of whoever opens it: enter it first.
    result = subprocess.run(
        [
            "nsenter",
            f"--net=/proc/{pid1}/ns/net",
            "/bin/sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/conf/tap0/route_localnet",
        ],
        capture_output=True,
        timeout=10,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    if result.returncode != 0:
        raise StartFailed(
            "cannot route the sandbox's ports to its loopback: "
            + result.stderr.decode(errors="replace").strip()
        )


def slirp_api(api_socket: Path, request: dict[str, Any]) -> dict[str, Any]:
    # Through an open descriptor of its directory, for the same 107-byte limit.
    dir_fd = os.open(api_socket.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect(f"/proc/self/fd/{dir_fd}/{api_socket.name}")
        finally:
            os.close(dir_fd)
        sock.sendall(json.dumps(request).encode())
        reply: dict[str, Any] = json.loads(sock.recv(65536) or b"{}")
        return reply


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def forward_port(api_socket: Path, guest_port: int, attempts: int = 5) -> int:
    """Forward 127.0.0.1:<free port> on the host to ``guest_port`` in the sandbox.

    slirp4netns cannot pick the port itself (0 is refused), so pick one and retry if another
    process takes it between our probe and slirp's bind.
    """
    last: dict[str, Any] = {}
    for _ in range(attempts):
        host_port = _free_port()
        last = slirp_api(
            api_socket,
            {
                "execute": "add_hostfwd",
                "arguments": {
                    "proto": "tcp",
                    "host_addr": "127.0.0.1",
                    "host_port": host_port,
                    "guest_port": guest_port,
                },
            },
        )
        if "error" not in last:
            return host_port
        time.sleep(0.01)
    raise StartFailed(f"cannot forward port {guest_port} into the sandbox: {last.get('error')}")
