import httpx

from kiln.testing.live import LiveServer
from tests.conftest import Account


def test_https_with_kiln_ca(live: LiveServer, alice: Account) -> None:
    with httpx.Client(base_url=live.url, verify=str(live.ca_file)) as http:
        r = http.get("api/v1/auth/me", headers=alice.headers)
        assert r.status_code == 200 and r.json()["username"] == "alice"
        assert r.headers["strict-transport-security"].startswith("max-age=")
