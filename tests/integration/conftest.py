"""Fixtures shared by the build tests (build_support.py) and the model tests (model_support.py)."""

from tests.integration.build_support import (  # noqa: F401
    build_registry,
    build_settings,
    builder,
    kiln_base,
    own_registry_site,
    shared_runtimes,
)
from tests.integration.model_support import (  # noqa: F401
    model_project,
    replicas,
    start_replica,
)
