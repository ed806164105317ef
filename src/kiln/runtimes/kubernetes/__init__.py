"""The ``kubernetes`` runtime: workloads as pods in per-tenant namespaces (see README)."""

from kiln.runtimes.kubernetes.runtime import KubernetesRuntime, KubeRuntimeConfig

__all__ = ["KubeRuntimeConfig", "KubernetesRuntime"]
