"""A project's disk quota holds for its workloads too: jobs in real sandboxes try to fill the
disk every way a filesystem allows, and never take the project more than
max(256 MiB, 5 %) past its quota; the run says why it failed, and the file API sees the same
usage. Quotas grow online and shrink only while nothing of the project runs."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from kiln.storage.volumes import margin_bytes
from tests.conftest import Account
from tests.integration.test_jobs_runner import ENDED, create, run_now, wait_run, write
from tests.integration.test_sessions_support import (  # noqa: F401  (fixture)
    make_project,
    runner,
    start_session,
)

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

MiB = 1024**2
QUOTA = 64 * MiB
LIMIT = QUOTA + margin_bytes(QUOTA)  # 320 MiB

ATTACKS = {
    # One huge preallocation: the kernel refuses it whole.
    "fallocate": "fallocate -l 2G big.bin",
    # Plain writes until the disk is full.
    "dd": "dd if=/dev/zero of=big.bin bs=1M count=2000 status=none",
    # A sparse file is free until it is written; then it counts block by block.
    "sparse": "truncate -s 100G sparse.bin && "
    "dd if=/dev/zero of=sparse.bin bs=1M count=2000 conv=notrunc status=none",
    # Many small files: blocks and inodes run out.
    "small-files": "mkdir -p many && for i in $(seq 1 200000); do "
    "printf '%4096s' x > many/$i || exit 1; done",
    # Hard links cost nothing more than the file they name.
    "hard-links": "dd if=/dev/zero of=big.bin bs=1M count=2000 status=none; "
    "for i in $(seq 1 50); do ln big.bin link$i.bin; done; "
    "dd if=/dev/zero of=more.bin bs=1M count=2000 status=none",
}


def usage(client: TestClient, project: str, who: Account) -> dict[str, Any]:
    response = client.get(f"{project}/usage", headers=who.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def set_quota(client: TestClient, project: str, admin: Account, quota: int | None) -> Any:
    return client.put(f"{project}/quota", json={"quota_bytes": quota}, headers=admin.headers)


@pytest.mark.usefixtures("runner")
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_job_cannot_take_its_project_past_the_margin(
    attack: str, client: TestClient, alice: Account, admin: Account
) -> None:
    project = make_project(client, alice)
    response = set_quota(client, project, admin, QUOTA)
    assert response.status_code == 200, response.text
    assert response.json()["enforced_for_workloads"] is True
    assert response.json()["limit_bytes"] == LIMIT

    write(client, project, alice, "fill.sh", f"{ATTACKS[attack]}\n")
    create(client, project, alice, name="fill", script="fill.sh")
    run = run_now(client, project, alice, "fill")
    done = wait_run(client, project, alice, "fill", run["id"], ENDED)

    used = usage(client, project, alice)["used_bytes"]
    assert QUOTA < used <= LIMIT, f"{attack}: {used} bytes used (limit {LIMIT})"
    assert done["state"] == "failed", done
    assert "project over its 64 MiB disk quota" in done["reason"], done["reason"]
    # The file API sees the same usage: past the quota, every write is refused.
    refused = client.put(f"{project}/files/more.txt", content=b"x", headers=alice.headers)
    assert refused.status_code == 507, refused.text
    assert "Quota exceeded" in refused.json()["detail"]


@pytest.mark.usefixtures("runner")
def test_quota_grows_online_and_shrinks_only_when_idle(
    client: TestClient, alice: Account, admin: Account, bob: Account
) -> None:
    project = make_project(client, alice)
    assert set_quota(client, project, admin, QUOTA).status_code == 200
    write(client, project, alice, "fill.sh", "dd if=/dev/zero of=big.bin bs=1M count=100\n")
    create(client, project, alice, name="fill", script="fill.sh")
    done = wait_run(
        client, project, alice, "fill", run_now(client, project, alice, "fill")["id"], ENDED
    )
    assert done["state"] == "succeeded", done  # 100 MiB: past the quota, within the margin
    assert (
        client.put(f"{project}/files/a.txt", content=b"a", headers=alice.headers).status_code == 507
    )

    # Only a site admin sets quotas; the project's own admin cannot.
    assert set_quota(client, project, alice, 10 * QUOTA).status_code == 403
    grown = set_quota(client, project, admin, 4 * QUOTA)
    assert grown.status_code == 200, grown.text
    assert grown.json()["limit_bytes"] == 4 * QUOTA + margin_bytes(4 * QUOTA)
    assert (
        client.put(f"{project}/files/a.txt", content=b"a", headers=alice.headers).status_code == 201
    )

    # Lower than what it holds: refused, with what to do.
    too_low = set_quota(client, project, admin, 32 * MiB)
    assert too_low.status_code == 409, too_low.text
    assert "delete files first" in too_low.json()["detail"]
    # While a session runs, the limit moves within the filesystem's image (online)...
    session = start_session(client, project, alice)
    online = set_quota(client, project, admin, 2 * QUOTA)
    assert online.status_code == 200, online.text
    assert online.json()["limit_bytes"] == 2 * QUOTA + margin_bytes(2 * QUOTA)
    # ...but a change past what the image can hold needs it resized, offline.
    busy = set_quota(client, project, admin, 4 * 1024 * MiB)
    assert busy.status_code == 409, busy.text
    assert "stopped first" in busy.json()["detail"]
    stopped = client.delete(f"{project}/sessions/{session['id']}", headers=alice.headers)
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["state"] in ENDED
    big = set_quota(client, project, admin, 4 * 1024 * MiB)
    assert big.status_code == 200, big.text
    assert big.json()["limit_bytes"] == 4 * 1024 * MiB + margin_bytes(4 * 1024 * MiB)
    read = client.get(f"{project}/files/a.txt", headers=alice.headers)
    assert read.status_code == 200 and read.content == b"a"
    # Strangers learn nothing; bad values are precise 422s.
    assert client.get(f"{project}/usage", headers=bob.headers).status_code == 404
    assert set_quota(client, project, admin, 5).status_code == 422
    # A quota no host disk can hold an image for (30 TB): a 422 saying so, nothing changed.
    huge = set_quota(client, project, admin, 30 * 10**12)
    assert huge.status_code == 422, huge.text
    assert "choose a smaller quota" in huge.json()["detail"]
    kept = client.get(f"{project}/usage", headers=alice.headers).json()
    assert kept["limit_bytes"] == 4 * 1024 * MiB + margin_bytes(4 * 1024 * MiB), kept
    read = client.get(f"{project}/files/a.txt", headers=alice.headers)
    assert read.status_code == 200 and read.content == b"a"  # mounted again
    bad = client.put(f"{project}/quota", json={"quota_bytes": "lots"}, headers=admin.headers)
    assert bad.status_code == 422
