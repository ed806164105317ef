"""Fixtures shared with the integration tests (see tests/integration/build_support.py)."""

from tests.integration.build_support import build_registry, kiln_base, shared_runtimes  # noqa: F401
