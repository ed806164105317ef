"""Metadata database: ORM models, engines, migrations.

Importing the package registers every model on ``Base.metadata`` (migrations and tests rely
on the full set)."""

from kiln.db import app_models as app_models
from kiln.db import build_models as build_models
from kiln.db import model_metric_models as model_metric_models
from kiln.db import model_models as model_models
from kiln.db import model_stats_models as model_stats_models
from kiln.db import registry_models as registry_models
from kiln.db import workload_models as workload_models
