"""Kiln's Python SDK: ``from kiln.sdk import Client``.

See ``kiln.sdk.client`` for an example. The ``kiln`` CLI is built on this client.
"""

from kiln.sdk.client import Client, create_api_key_with_password
from kiln.sdk.config import SavedLogin, config_path, load_login
from kiln.sdk.errors import (
    KilnAPIError,
    KilnConnectionError,
    KilnSDKError,
    KilnTLSError,
    NotLoggedIn,
)
from kiln.sdk.models import ApiKey, ApiKeyCreated, FileEntry, FileWritten, PathEntry, Project, User

__all__ = [
    "ApiKey",
    "ApiKeyCreated",
    "Client",
    "FileEntry",
    "FileWritten",
    "KilnAPIError",
    "KilnConnectionError",
    "KilnSDKError",
    "KilnTLSError",
    "NotLoggedIn",
    "PathEntry",
    "Project",
    "SavedLogin",
    "User",
    "config_path",
    "create_api_key_with_password",
    "load_login",
]
