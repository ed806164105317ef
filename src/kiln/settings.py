"""Kiln's settings, as data.

Every setting comes from a ``KILN_*`` environment variable, an optional ``kiln.toml`` (path in
``KILN_CONFIG_FILE``, default ``./kiln.toml``), or its default. Each service has one nested
model whose environment prefix is derived from its path: ``KILN_WEB_PORT`` sets
``settings.web.port``. The embedded defaults run a whole site on one machine with nothing to
configure.
"""

from __future__ import annotations

import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# Values that mean "somebody forgot to set this"; refused outside development, as is any
# secret too short to resist guessing.
PLACEHOLDER_SECRETS = frozenset({"", "change-me", "changeme", "secret", "kiln", "password"})
MIN_SECRET_LENGTH = 16


class WebSettings(BaseSettings):
    """The public web tier: UI, REST API, git smart HTTP."""

    model_config = SettingsConfigDict(env_prefix="KILN_WEB_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address the HTTPS listener binds.")
    port: int = Field(8443, ge=1, le=65535, description="Port of the HTTPS listener.")
    workers: int = Field(
        1, ge=1, le=64, description="Web worker processes (each with its own DB pool)."
    )
    access_log: bool = Field(False, description="Log every HTTP request (costly under load).")
    tls: bool = Field(True, description="Serve HTTPS with a certificate from Kiln's CA.")
    session_hours: int = Field(12, ge=1, description="Lifetime of a browser login.")
    max_request_bytes: int = Field(
        64 * 1024 * 1024, description="Largest request body the API accepts (JSON or upload)."
    )
    login_failures_before_delay: int = Field(
        3, description="Failed logins per user or address before each attempt is slowed down."
    )


class StorageSettings(BaseSettings):
    """Project files."""

    model_config = SettingsConfigDict(env_prefix="KILN_STORAGE_", extra="ignore")

    project_quota_bytes: int = Field(
        10 * 1024**3, description="Default per-project quota for files (bytes)."
    )
    max_file_bytes: int = Field(
        512 * 1024**2, description="Largest single file accepted by a PUT (bytes)."
    )
    max_archive_bytes: int = Field(
        1024**3, description="Largest total uncompressed size of an uploaded project archive."
    )
    max_archive_entries: int = Field(
        50_000, description="Most entries an uploaded project archive may contain."
    )
    max_push_bytes: int = Field(
        512 * 1024**2, description="Largest git push accepted (bytes of pack data)."
    )
    project_volumes: bool = Field(
        True,
        description=(
            "Give each project its own filesystem image (loop-mounted), so that its quota "
            "also bounds what workloads write. Needs root; without it quotas bind only the "
            "file API and git."
        ),
    )


class RunnerSettings(BaseSettings):
    """The runner: runs workloads, serves the web tier over gRPC with mutual TLS."""

    model_config = SettingsConfigDict(env_prefix="KILN_RUNNER_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address the gRPC listener binds.")
    port: int = Field(8450, ge=1, le=65535, description="Port of the gRPC listener.")
    state_dir: Path | None = Field(
        None, description="Workload records and sandboxes' state; default DATA_DIR/runner."
    )
    max_log_bytes: int = Field(
        16 * 1024**2, ge=0, description="Console output kept per workload run (default, cap)."
    )
    host_uid: int = Field(
        8536, ge=1, description="Host uid workloads run as (CML's cdsw uid; never 0)."
    )
    runtime: Literal["local", "kubernetes"] = Field(
        "local", description="Where workloads run: bubblewrap sandboxes here, or pods."
    )
    user_quota_cpu_millis: int = Field(
        4000,
        ge=1,
        description="Default per-user quota: vCPU in thousandths. Four workloads of the "
        "default size (1 vCPU, 2 GiB): two sessions, a job and its dependent run together.",
    )
    user_quota_memory_bytes: int = Field(
        8 * 1024**3, ge=1, description="Default per-user quota: memory (CML's 8 GiB)."
    )
    user_quota_gpu: int = Field(0, ge=0, description="Default per-user quota: GPUs.")
    workload_egress: bool = Field(
        True,
        description="Workloads may open connections to the network (PyPI, data sources), "
        "never to this host's own addresses (Kiln's listeners, the database).",
    )
    workload_egress_deny: list[str] = Field(
        default_factory=lambda: ["169.254.0.0/16"],
        description="Networks (CIDR, optionally :port) workloads never reach even with "
        "egress on; default: link-local, where cloud metadata services live.",
    )
    reconcile_interval: float = Field(
        1.0,
        gt=0,
        le=60,
        description="Seconds between the reconciler's periodic passes (it also wakes on "
        "every queued run and every workload exit).",
    )
    app_start_seconds: int = Field(
        120,
        ge=5,
        le=3600,
        description="How long an application's instance may take to answer on its port "
        "before its start counts as failed (it is then restarted with back-off).",
    )
    webhook_allowed_networks: list[str] = Field(
        default_factory=list,
        description="CIDR networks job webhooks may reach although private or local "
        "(Kiln's own ports stay refused). Default: public addresses only.",
    )


class KubernetesSettings(BaseSettings):
    """The ``kubernetes`` runtime (``KILN_RUNNER_RUNTIME=kubernetes``): workloads as pods."""

    model_config = SettingsConfigDict(env_prefix="KILN_KUBERNETES_", extra="ignore")

    kubeconfig: Path | None = Field(
        None, description="kubeconfig file; unset: the pod's service account (in a cluster)."
    )
    context: str | None = Field(None, description="kubeconfig context; unset: its current one.")
    namespace: str = Field("kiln", description="The namespace Kiln's own services run in.")
    default_image: str = Field(
        "",
        description="Image for workloads whose runtime has none in Kiln's registry (the "
        "built-in runtime cannot run in a pod).",
    )
    registry: str = Field(
        "",
        description="Kiln's registry as the nodes pull from it (host[:port]); each tenant "
        "namespace gets a pull secret for it. Empty: no pull secret.",
    )
    registry_username: str = Field(
        "", description="Account whose API key the pull secrets carry (runtimes are public)."
    )
    registry_password: str = Field("", description="That account's API key (pull only).")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Labels of the compute pool's nodes."
    )
    tolerations: list[str] = Field(
        default_factory=list,
        description="Taints of the compute pool that workload pods tolerate: key=value:Effect.",
    )
    storage_class: str = Field("kiln-projects", description="storageClassName of project PVs.")
    nfs_server: str = Field("", description="NFS server exporting the projects directory.")
    nfs_path: str = Field("/", description="Export path holding one directory per project.")
    host_path: str = Field(
        "", description="Instead of NFS: the projects directory as every node sees it."
    )
    web_port: int = Field(8443, description="Port of the web tier's pods (workloads' Kiln API).")
    web_url: str = Field(
        "",
        description="The Kiln API as workload pods reach it, e.g. https://kiln-web.kiln.svc/ "
        "(the chart sets its web Service): sessions and job runs get it as KILN_API_URL and "
        "CDSW_API_URL, with Kiln's CA bundle and SDK at /run/kiln. Empty: pods get no Kiln "
        "API.",
    )
    cluster_cidrs: list[str] = Field(
        default_factory=list,
        description="Networks no workload may reach (the cluster's pod and service ranges).",
    )
    autoscaling: bool = Field(
        False,
        description="A cluster autoscaler grows the compute pool: a pod that does not fit "
        "waits for a new node instead of failing at once.",
    )
    start_timeout: float = Field(300.0, gt=0, description="Seconds a pod may take to start.")
    runner_role: str = Field(
        "", description="ClusterRole bound to the runner in each namespace it creates."
    )
    runner_service_account: str = Field(
        "kiln-runner", description="The runner's service account (in `namespace`)."
    )
    builder_service_account: str = Field(
        "kiln-builder",
        description="The builder's service account (in `namespace`), bound to `runner_role` "
        "in each namespace where it runs a build's install pod.",
    )
    headroom_sessions: int = Field(
        0, ge=0, description="Placeholder pods keeping room for this many sessions."
    )
    headroom_cpu_millis: int = Field(1000, ge=1, description="Size of one placeholder: vCPU.")
    headroom_memory_bytes: int = Field(
        2 * 1024**3, ge=1, description="Size of one placeholder: memory."
    )

    @field_validator("web_url")
    @classmethod
    def _web_url_is_http(cls, value: str) -> str:
        url = urlsplit(value)
        if value and (url.scheme not in ("http", "https") or not url.hostname):
            raise ValueError(
                f"KILN_KUBERNETES_WEB_URL {value!r} must be an http(s) URL with a host, "
                "e.g. https://kiln-web.kiln.svc/"
            )
        return value


class RegistrySettings(BaseSettings):
    """Kiln's OCI registry at ``/v2/`` on the web tier (storage in DATA_DIR/registry)."""

    model_config = SettingsConfigDict(env_prefix="KILN_REGISTRY_", extra="ignore")

    max_upload_bytes: int = Field(
        20 * 1024**3, ge=1, description="Largest blob one upload may push (bytes)."
    )
    token_seconds: int = Field(
        300, ge=10, le=3600, description="Lifetime of a registry token from /v2/token."
    )
    gc_grace_seconds: int = Field(
        3600,
        ge=0,
        description="Blobs pushed but not yet referenced by a manifest are kept this long "
        "(a client pushes layers before the manifest that names them).",
    )
    upload_expiry_seconds: int = Field(
        24 * 3600, ge=60, description="An upload left untouched this long is abandoned."
    )
    gc_interval_seconds: int = Field(
        6 * 3600,
        ge=0,
        description="How often the runner collects the registry's garbage (0: never; "
        "`kiln registry gc` runs it by hand).",
    )


class BuilderSettings(BaseSettings):
    """The builder: turns project snapshots into OCI images (source-to-image)."""

    model_config = SettingsConfigDict(env_prefix="KILN_BUILDER_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address the gRPC listener binds.")
    port: int = Field(8451, ge=1, le=65535, description="Port of the gRPC listener.")
    state_dir: Path | None = Field(
        None, description="Build logs, work directories, sandboxes; default DATA_DIR/builder."
    )
    max_concurrent_builds: int = Field(
        2, ge=1, le=64, description="Builds this builder runs at once; the rest wait queued."
    )
    timeout_minutes: int = Field(
        30, ge=1, le=24 * 60, description="A build running longer is stopped (timed_out)."
    )
    max_file_bytes: int = Field(
        50 * 1024**2,
        ge=1,
        description="A tracked file larger than this fails the build (CML: 50 MiB); "
        "large data belongs in .gitignore.",
    )
    cpu_millis: int = Field(1000, ge=1, description="vCPU of a build's install, in thousandths.")
    memory_bytes: int = Field(
        4 * 1024**3,
        ge=256 * 1024**2,
        description="Memory of a build's install; the installed files count against it.",
    )
    pids_max: int = Field(1024, ge=64, description="Processes a build's install may have.")
    deps_max_bytes: int = Field(
        3 * 1024**3, ge=16 * 1024**2, description="Largest dependency prefix an install writes."
    )
    tmp_bytes: int = Field(
        1024**3,
        ge=16 * 1024**2,
        description="Size of a build install's private temporary directory.",
    )
    max_log_bytes: int = Field(16 * 1024**2, ge=0, description="Log kept per build.")
    registry_url: str | None = Field(
        None,
        description="Registry builds push to and read bases from (https://host:port); "
        "default: Kiln's own.",
    )
    registry_username: str | None = Field(None, description="User name at that registry.")
    registry_password: str | None = Field(None, description="Its password or token.")
    registry_ca_file: Path | None = Field(
        None, description="CA bundle to verify that registry's certificate with."
    )
    runtime: Literal["local", "kubernetes"] = Field(
        "local",
        description="Where a build's install step runs: `local`, a sandbox on the builder's "
        "own machine; `kubernetes`, a pod of the build's base image in its tenant's namespace "
        "(the kubernetes.* settings; the Helm chart sets this).",
    )
    base_image: str = Field(
        "runtimes/python:3.11", description="The base a build starts from unless it names one."
    )
    build_base_on_start: bool = Field(
        True,
        description="Build Kiln's Debian base image in the background at start when the "
        "registry has none.",
    )
    base_cache_dir: Path | None = Field(
        None, description="Built base images, by recipe hash; default DATA_DIR/builder/base."
    )
    base_ca_dir: Path | None = Field(
        Path("/usr/local/share/ca-certificates"),
        description="CA certificates (*.crt) installed into the base image, so pip trusts "
        "what this host trusts (a proxy, a private index).",
    )
    debian_mirror: str = Field(
        "http://deb.debian.org/debian", description="Debian mirror for the base image."
    )
    pip_index_url: str | None = Field(None, description="PIP_INDEX_URL for builds.")
    pip_extra_index_url: str | None = Field(None, description="PIP_EXTRA_INDEX_URL for builds.")
    heartbeat_seconds: float = Field(
        5.0, gt=0, le=60, description="How often a running build's claim is renewed."
    )
    lost_after_seconds: float = Field(
        60.0,
        gt=0,
        description="A build whose claim was not renewed for this long is taken as lost "
        "(its builder died) and retried once.",
    )


class ModelSettings(BaseSettings):
    """Models: the model router and the model server in replicas."""

    model_config = SettingsConfigDict(env_prefix="KILN_MODELS_", extra="ignore")

    allow_unauthenticated: bool = Field(
        False,
        description="Whether a model's admins may switch its authentication off (its endpoint "
        "then answers anyone who has the model's access key).",
    )
    max_body_bytes: int = Field(
        5 * 1024 * 1024, ge=1024, description="Largest request body of a model call (CML's 5 MB)."
    )
    queue_seconds: float = Field(
        30.0,
        gt=0,
        description="How long a call waits for a free replica before 503 (CML's 30 s).",
    )
    call_timeout_seconds: float = Field(
        60.0, gt=0, description="How long a replica may take to answer one call before 504."
    )
    api_key_days: int = Field(
        365, ge=1, le=3650, description="Default lifetime of a model API key, in days."
    )
    max_replicas: int = Field(
        16, ge=1, le=256, description="Most replicas one deployment may ask for."
    )
    replica_start_seconds: int = Field(
        300,
        ge=5,
        le=3600,
        description="How long a replica may take to be ready (its model file imported) before "
        "its start counts as failed: a new deployment then fails, a serving one restarts it.",
    )
    metrics_retention_days: int = Field(
        30,
        ge=1,
        le=3650,
        description="Days the metrics a model's code tracks (cml.metrics_v1) are kept; the "
        "runner deletes older ones.",
    )
    stats_retention_days: int = Field(
        7,
        ge=1,
        le=400,
        description="How long the per-minute request statistics of models (calls, errors, "
        "latency) are kept before the runner prunes them.",
    )
    stats_flush_seconds: float = Field(
        5.0,
        gt=0,
        le=300,
        description="How often each web process adds the model calls it counted to the "
        "database (the model page's plots lag by at most this).",
    )


class Settings(BaseSettings):
    """The whole site's settings."""

    # The nested split lets KILN_WEB_PORT reach ``web.port`` through this model too, so that
    # an environment variable beats a kiln.toml [web] entry, as it does at the top level.
    model_config = SettingsConfigDict(
        env_prefix="KILN_", extra="ignore", env_nested_delimiter="_", env_nested_max_split=1
    )

    env: Literal["development", "production", "test"] = Field(
        "production", description="`development` relaxes the placeholder-secret check."
    )
    data_dir: Path = Field(Path(".kiln-data"), description="Where Kiln keeps all its state.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; default SQLite in the data dir. PostgreSQL: "
        "postgresql+psycopg://user@host/db",
    )
    secret_key: str | None = Field(
        None,
        description="Signs tokens. Default: generated once and kept in DATA_DIR/secret.key.",
    )
    domain: str = Field(
        "localhost", description="Public host name; user content lives on <id>.<domain>."
    )
    admin_username: str = Field("admin", description="First site admin, seeded on an empty DB.")
    admin_password: str | None = Field(
        None, description="Password of the first admin; generated and printed once if unset."
    )
    web: WebSettings = Field(default_factory=WebSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    builder: BuilderSettings = Field(default_factory=BuilderSettings)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get("KILN_CONFIG_FILE", "kiln.toml"))
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file))

    @model_validator(mode="after")
    def _refuse_placeholder_secret(self) -> Settings:
        if self.secret_key is None or self.env == "development":
            return self
        if self.secret_key.strip().lower() in PLACEHOLDER_SECRETS:
            raise ValueError(
                "KILN_SECRET_KEY is a placeholder; set a random value (or unset it to let Kiln "
                "generate one), or set KILN_ENV=development"
            )
        if len(self.secret_key.strip()) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"KILN_SECRET_KEY is shorter than {MIN_SECRET_LENGTH} characters; set a long "
                "random value (or unset it to let Kiln generate one)"
            )
        return self

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'kiln.db').resolve()}"

    @property
    def projects_dir(self) -> Path:
        return self.data_dir / "projects"

    @property
    def runtimes_dir(self) -> Path:
        """The content-addressed cache of unpacked runtime images."""
        return self.data_dir / "runtimes"

    @property
    def registry_dir(self) -> Path:
        """The registry's content-addressed blobs and uploads in progress."""
        return self.data_dir / "registry"

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @cached_property
    def secret(self) -> bytes:
        """The signing secret: configured, or generated once and kept in the data dir."""
        if self.secret_key:
            return self.secret_key.encode()
        path = self.data_dir / "secret.key"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
        return path.read_text().strip().encode()


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
