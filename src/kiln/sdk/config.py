"""The per-user login file that ``kiln login`` writes and ``Client.from_config()`` reads.

Location: ``$KILN_CONFIG_DIR/config.json``, else ``$XDG_CONFIG_HOME/kiln/config.json``, else
``~/.config/kiln/config.json``. The file holds an API key, so it is created with mode 0600
from its first byte (a temporary file opened 0600, then renamed over the old one): it is
never readable by others, not even for a moment, and a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from kiln.sdk.errors import KilnSDKError, NotLoggedIn

CONFIG_NAME = "config.json"


class SavedLogin(BaseModel):
    """One server and the API key the CLI uses for it."""

    url: str = Field(description="Base URL of the Kiln site, ending with '/'.")
    api_key: str
    key_id: int | None = Field(None, description="ID of api_key, so logout can revoke it.")
    username: str | None = None
    ca_file: str | None = Field(None, description="CA certificate to trust for this site.")
    insecure: bool = Field(False, description="Skip TLS verification (not recommended).")

    @property
    def verify(self) -> bool | str:
        if self.insecure:
            return False
        return self.ca_file or True


def config_dir() -> Path:
    explicit = os.environ.get("KILN_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return base / "kiln"


def config_path(directory: Path | None = None) -> Path:
    return (directory or config_dir()) / CONFIG_NAME


def load_login(directory: Path | None = None) -> SavedLogin:
    path = config_path(directory)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise NotLoggedIn("not logged in: run `kiln login URL` first") from exc
    except OSError as exc:
        raise KilnSDKError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return SavedLogin.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise KilnSDKError(f"{path} is damaged; delete it and run `kiln login URL` again") from exc


def save_login(login: SavedLogin, directory: Path | None = None) -> Path:
    """Write the login file atomically with mode 0600; its directory gets 0700."""
    path = config_path(directory)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{CONFIG_NAME}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)  # the umask only removes bits; make the mode exact
            f.write(login.model_dump_json(indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def forget_login(directory: Path | None = None) -> bool:
    """Delete the login file; False when there was none."""
    try:
        config_path(directory).unlink()
    except FileNotFoundError:
        return False
    return True
