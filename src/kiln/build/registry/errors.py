"""The registry's errors: the OCI distribution spec's codes, each with its HTTP status.

``RegistryError`` is a ``KilnError``: code that calls the registry in process (the builder,
``kiln runtimes add``) handles it like any other Kiln error; on ``/v2/`` it leaves as the
spec's body, ``{"errors": [{"code": ..., "message": ..., "detail": ...}]}``.
"""

from __future__ import annotations

from typing import Any

from kiln.domain.errors import KilnError


class RegistryError(KilnError):
    code = "UNSUPPORTED"
    status = 400
    title = "Registry error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.extra_detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.detail}
        if self.extra_detail is not None:
            error["detail"] = self.extra_detail
        return {"errors": [error]}


class BlobUnknown(RegistryError):
    code = "BLOB_UNKNOWN"
    status = 404
    title = "Blob unknown"


class BlobUploadInvalid(RegistryError):
    code = "BLOB_UPLOAD_INVALID"
    status = 400
    title = "Blob upload invalid"


class BlobUploadUnknown(RegistryError):
    code = "BLOB_UPLOAD_UNKNOWN"
    status = 404
    title = "Blob upload unknown"


class DigestInvalid(RegistryError):
    code = "DIGEST_INVALID"
    status = 400
    title = "Digest invalid"


class ManifestBlobUnknown(RegistryError):
    code = "MANIFEST_BLOB_UNKNOWN"
    status = 404
    title = "Manifest references unknown content"


class ManifestInvalid(RegistryError):
    code = "MANIFEST_INVALID"
    status = 400
    title = "Manifest invalid"


class ManifestUnknown(RegistryError):
    code = "MANIFEST_UNKNOWN"
    status = 404
    title = "Manifest unknown"


class NameInvalid(RegistryError):
    code = "NAME_INVALID"
    status = 400
    title = "Repository name invalid"


class NameUnknown(RegistryError):
    code = "NAME_UNKNOWN"
    status = 404
    title = "Repository unknown"


class SizeInvalid(RegistryError):
    code = "SIZE_INVALID"
    status = 400
    title = "Size invalid"


class Unauthorized(RegistryError):
    code = "UNAUTHORIZED"
    status = 401
    title = "Authentication required"


class Denied(RegistryError):
    code = "DENIED"
    status = 403
    title = "Denied"


class Unsupported(RegistryError):
    code = "UNSUPPORTED"
    status = 405
    title = "Unsupported"
