"""The registry's pure rules: OCI names and Kiln's mapping onto them, image references,
token scopes, and token signing."""

from __future__ import annotations

import pytest

from kiln.build.oci.registry_source import parse_image_ref
from kiln.build.registry.access import Scope, parse_scopes
from kiln.build.registry.errors import DigestInvalid, NameInvalid
from kiln.build.registry.names import (
    check_digest,
    check_tag,
    oci_component,
    parse_repository,
    project_repository,
)
from kiln.build.registry.tokens import Grant, InvalidToken, issue, signing_key, verify
from kiln.domain.resources import default_runtime_name


@pytest.mark.parametrize(
    ("name", "owner", "project"),
    [
        ("alice/churn/app", "alice", "churn"),
        ("team.x/my-proj/models/scorer", "team.x", "my-proj"),
        ("a__b/c--d/e_f", "a__b", "c--d"),
        ("runtimes/python", None, None),
        ("runtimes/python/gpu", None, None),
    ],
)
def test_repository_names_parse_into_kilns_namespaces(
    name: str, owner: str | None, project: str | None
) -> None:
    parsed = parse_repository(name)
    assert (parsed.owner, parsed.project, parsed.is_runtime) == (owner, project, owner is None)


@pytest.mark.parametrize(
    "name",
    [
        "Alice/churn/app",
        "alice/churn/a..b",
        "alice/../etc",
        "alice/churn/-app",
        "alice/churn/app_",
        "alice//app",
        "alice/churn/a_-b",
        "alice/churn",  # a project's repositories have a third part
        "runtimes",
        "alice/churn/" + "a" * 250,
    ],
)
def test_bad_repository_names_are_refused(name: str) -> None:
    with pytest.raises(NameInvalid):
        parse_repository(name)


@pytest.mark.parametrize(
    ("kiln", "oci"),
    [
        ("alice", "alice"),
        ("my-project", "my-project"),
        ("a.b_c__d---e", "a.b_c__d---e"),  # every run OCI allows stays
        ("a_-b", "a-b"),
        ("x._y", "x-y"),
        ("m___n", "m-n"),
        ("a-.b-_c", "a-b-c"),
    ],
)
def test_kiln_names_map_onto_oci_components(kiln: str, oci: str) -> None:
    assert oci_component(kiln) == oci
    parse_repository(project_repository(kiln, kiln, "app"))  # always a valid name


def test_tags_and_digests() -> None:
    assert check_tag("v1.0_rc-2") == "v1.0_rc-2"
    for bad in ("-v1", ".x", "a" * 129, "v/1", ""):
        with pytest.raises(NameInvalid):
            check_tag(bad)
    check_digest("sha256:" + "a" * 64)
    check_digest("sha512:" + "b" * 128)
    for bad in ("sha256:" + "A" * 64, "sha256:abc", "sha512:" + "b" * 64, "nodigest"):
        with pytest.raises(DigestInvalid, match="invalid digest"):
            check_digest(bad)
    with pytest.raises(DigestInvalid, match="unsupported digest algorithm"):
        check_digest("md5:" + "0" * 32)


@pytest.mark.parametrize(
    ("text", "repository", "reference"),
    [
        ("runtimes/python:3.12", "runtimes/python", "3.12"),
        ("runtimes/python", "runtimes/python", "latest"),
        ("localhost:8443/runtimes/python:3.12", "runtimes/python", "3.12"),
        ("kiln.example.com/alice/churn/app:v1", "alice/churn/app", "v1"),
        ("runtimes/python@sha256:" + "c" * 64, "runtimes/python", "sha256:" + "c" * 64),
    ],
)
def test_image_references(text: str, repository: str, reference: str) -> None:
    ref = parse_image_ref(text)
    assert (ref.repository, ref.reference) == (repository, reference)


def test_default_runtime_names_come_from_the_image() -> None:
    assert default_runtime_name("runtimes/python", "3.12") == "python-3.12"
    assert default_runtime_name("runtimes/python", "latest") == "python"
    assert default_runtime_name("runtimes/py", "sha256:" + "d" * 64) == "py-" + "d" * 12


def test_scopes_from_token_requests() -> None:
    scopes = parse_scopes(
        [
            "repository:alice/churn/app:pull,push repository:runtimes/python:pull",
            "repository:alice/churn/app:*",
            "registry:catalog:*",
            "repository:alice/churn/app:pull,frobnicate",
        ]
    )
    assert scopes == [
        Scope("alice/churn/app", frozenset({"pull", "push"})),
        Scope("runtimes/python", frozenset({"pull"})),
        Scope("alice/churn/app", frozenset({"pull", "push", "delete"})),
        Scope("alice/churn/app", frozenset({"pull"})),
    ]
    assert scopes[0].header() == "repository:alice/churn/app:pull,push"


def test_tokens_verify_only_with_their_key_and_within_their_lifetime() -> None:
    key = signing_key(b"x" * 32)
    grant = Grant("alice/churn/app", frozenset({"pull"}))
    token, claims = issue(key, subject="alice", user_id=7, grants=[grant], lifetime=300, now=1000)
    checked = verify(key, token, now=1100)
    assert checked == claims and checked.allows("alice/churn/app", "pull")
    assert not checked.allows("alice/churn/app", "push")
    assert not checked.allows("alice/churn/other", "pull")
    with pytest.raises(InvalidToken, match="expired"):
        verify(key, token, now=1300)
    with pytest.raises(InvalidToken, match="not valid yet"):
        verify(key, token, now=900)
    with pytest.raises(InvalidToken, match="signature"):
        verify(signing_key(b"y" * 32), token, now=1100)
    with pytest.raises(InvalidToken):
        verify(key, "kiln_not_a_token", now=1100)
    assert signing_key(b"x" * 32) != b"x" * 32  # derived, never the site secret itself
