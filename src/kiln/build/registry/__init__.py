"""Kiln's OCI registry: storage (``storage.BlobStore``), metadata and rules
(``service.Registry``), garbage collection (``gc``), tokens and access (``tokens``,
``access``), and ``/v2/`` (``http``). See ``src/kiln/build/README.md``."""
