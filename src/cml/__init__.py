"""CML's in-workload library, as Kiln provides it: ``cml.models_v1`` (the ``cml_model``
decorator, ``call_model``) and ``cml.metrics_v1`` (``track_metric``, ``read_metrics`` ...).

Standard library only; see ``cml._core`` for where metrics go in a session, a job and a
replica. The same functions under CDSW's names are in the ``cdsw`` module.
"""
