"""How the kubernetes runtime's pods reach the Kiln API (``kubernetes.web_url``): nothing
without a URL, a clear error for a bad one, and in a cluster (the CA's certificate
delivered, its key held by `kiln pki` alone) the bundle from that certificate, with no CA
made here."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kiln.pki.ca import CertificateAuthority
from kiln.runner.webaccess import pod_web_access
from kiln.runtimes.base import WorkloadSpec
from kiln.settings import KubernetesSettings, Settings


def settings(tmp_path: Path, web_url: str) -> Settings:
    made = Settings(env="test", data_dir=tmp_path / "data", secret_key="x" * 32)
    made.kubernetes.web_url = web_url
    return made


def test_without_a_url_pods_get_no_kiln_api(tmp_path: Path) -> None:
    assert pod_web_access(settings(tmp_path, ""), tmp_path / "state") is None


@pytest.mark.parametrize("url", ["kiln-web.kiln.svc", "ftp://kiln-web/", "https:///api"])
def test_a_url_that_is_not_http_is_refused_in_words(url: str) -> None:
    with pytest.raises(ValidationError, match="must be an http\\(s\\) URL with a host"):
        KubernetesSettings(web_url=url)


def test_in_a_cluster_the_delivered_ca_is_bundled_and_no_ca_is_made(tmp_path: Path) -> None:
    site = settings(tmp_path, "https://kiln-web.kiln.svc/")
    holder = CertificateAuthority(tmp_path / "holder")  # `kiln pki`, elsewhere
    holder.load_or_create()
    site.pki_dir.mkdir(parents=True)
    (site.pki_dir / "ca.crt").write_bytes(holder.cert_path.read_bytes())  # delivered
    access = pod_web_access(site, tmp_path / "state")
    assert access is not None
    assert access.url == "https://kiln-web.kiln.svc/"
    assert not (site.pki_dir / "ca.key").exists()
    bundle = (access.files_dir / "ca-bundle.crt").read_bytes()
    assert bundle.endswith(holder.cert_path.read_bytes())
    assert (access.files_dir / "python" / "kiln" / "sdk" / "workers.py").is_file()
    spec = access.wire(WorkloadSpec(id="s1", project_dir=tmp_path, command=("true",)))
    assert spec.env["CDSW_API_URL"] == "https://kiln-web.kiln.svc/api/v1"
    assert spec.readonly_binds == ((access.files_dir, "/run/kiln"),)
