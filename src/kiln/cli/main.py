"""`kiln`: run the platform and talk to it.

Server commands (`up`, `db`, `users`) work on the local data directory; client commands
(`login`, `projects`, `files`, `keys`) talk to a Kiln server over HTTPS with an API key.
"""

from __future__ import annotations

import typer

from kiln.cli import (
    apps_cmd,
    builder_cmd,
    builds_cmd,
    client,
    jobs_cmd,
    models_cmd,
    pki_cmd,
    registry_cmd,
    runner_cmd,
    runtimes_cmd,
    server,
    sessions_cmd,
    up,
)

app = typer.Typer(
    name="kiln",
    help="Kiln: a self-hosted machine-learning workbench. Run `kiln up` to start a site.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
up.register(app)
server.register(app)
client.register(app)
runner_cmd.register(app)
builder_cmd.register(app)
runtimes_cmd.register(app)
registry_cmd.register(app)
pki_cmd.register(app)
app.add_typer(jobs_cmd.app, name="jobs")
app.add_typer(sessions_cmd.app, name="sessions")
app.add_typer(builds_cmd.app, name="builds")
app.add_typer(apps_cmd.app, name="apps")
app.add_typer(models_cmd.app, name="models")


if __name__ == "__main__":
    app()
