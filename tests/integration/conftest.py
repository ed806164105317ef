"""Fixtures shared by the build tests (see build_support.py)."""

from tests.integration.build_support import (  # noqa: F401
    build_registry,
    build_settings,
    builder,
    kiln_base,
    shared_runtimes,
)
