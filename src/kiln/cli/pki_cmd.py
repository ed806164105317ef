"""`kiln pki`: the internal CA's holder in a cluster (the chart's kiln-pki Deployment)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Annotated

import typer

app = typer.Typer(help="Kiln's internal CA in a Kubernetes cluster.", no_args_is_help=True)

Namespace = Annotated[str, typer.Option(help="Namespace Kiln runs in (its Secrets live there).")]
Prefix = Annotated[str, typer.Option(help="Secret name prefix (the Helm release's full name).")]
Domain = Annotated[str, typer.Option(help="Public host name (the web tier's HTTPS names).")]
Kubeconfig = Annotated[
    str | None, typer.Option(help="kubeconfig file; default: the pod's service account.")
]


@app.command("issue-secrets")
def issue_secrets_command(
    namespace: Namespace,
    prefix: Prefix = "kiln",
    domain: Domain = "localhost",
    kubeconfig: Kubeconfig = None,
    every: Annotated[
        float, typer.Option(help="Seconds between passes; 0: one pass, then exit.")
    ] = 0,
) -> None:
    """Make the CA on first use (in Secret PREFIX-ca, readable only by this command's
    service account) and issue every service's certificate into PREFIX-<service>-tls,
    reissuing those near expiry or from an older CA. With --every, keep doing so until
    SIGTERM (the chart's kiln-pki Deployment)."""
    from kiln.pki.cluster import issue_secrets
    from kiln.runtimes.kubernetes.client import Kube

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    kube = Kube.from_kubeconfig(kubeconfig)
    stopping = threading.Event()
    if every > 0:
        signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    while True:
        try:
            done = issue_secrets(kube, namespace, prefix, domain)
            for name, why in done.written.items():
                typer.echo(f"wrote {name} ({why})")
        except Exception as exc:
            if every <= 0:
                raise
            logging.getLogger("kiln.pki").error("issuing certificates failed: %s", exc)
        if every <= 0 or stopping.wait(every):
            return


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="pki")
