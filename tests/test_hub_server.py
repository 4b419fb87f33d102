"""The contract of tests/hub_server.py that test_push.py relies on, checked over plain HTTP (urllib).

huggingface_hub's own behaviour against the server is exercised by test_push.py's real pushes and loads.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest

from .hub_server import HubServer


TOKEN = "hf_test_server_token"


@pytest.fixture
def hub():
    with HubServer(TOKEN) as server:
        yield server


def _call(
    hub: HubServer,
    method: str,
    path: str,
    payload: object = None,
    token: str | None = TOKEN,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    data = body if body is not None else (json.dumps(payload).encode() if payload is not None else None)
    request = urllib.request.Request(hub.url + path, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_a_wrong_or_missing_token_is_refused_and_creates_nothing(hub):
    assert _call(hub, "POST", "/api/repos/create", {"name": "x"}, token="hf_wrong")[0] == 401
    assert _call(hub, "POST", "/api/repos/create", {"name": "x"}, token=None)[0] == 401
    assert not hub.repo_exists("user/x")
    hub.add_repo("user/public", {"a.txt": b"a"})
    assert _call(hub, "GET", "/user/public/resolve/main/a.txt", token="hf_wrong")[0] == 401  # on reads too
    assert _call(hub, "POST", "/api/repos/create", {"name": "x", "private": True})[0] == 200
    assert hub.is_private("user/x") and _call(hub, "POST", "/api/repos/create", {"name": "x"})[0] == 409
    assert [r.headers.get("authorization") for r in hub.requests][-1] == f"Bearer {TOKEN}"


def test_a_private_repo_is_hidden_without_a_token(hub):
    hub.add_repo("user/secret", {"config.json": b"{}"}, private=True)
    status, headers, _ = _call(hub, "GET", "/user/secret/resolve/main/config.json", token=None)
    assert status == 401 and headers["X-Error-Code"] == "RepoNotFound"
    status, headers, body = _call(hub, "GET", "/user/secret/resolve/main/config.json")
    assert status == 200 and body == b"{}" and headers["X-Repo-Commit"]
    assert _call(hub, "GET", "/api/models/user/secret", token=None)[0] == 401
    assert json.loads(_call(hub, "GET", "/api/models/user/secret")[2])["private"] is True


def test_a_commit_lands_on_its_branch_and_failures_are_injected_without_storing_anything(hub):
    hub.add_repo("user/name")
    assert _call(hub, "POST", "/api/models/user/name/branch/dev", {})[0] == 200
    commit = b"\n".join(
        json.dumps(line).encode()
        for line in (
            {"key": "header", "value": {"summary": "up"}},
            {"key": "file", "value": {"path": "w.safetensors", "content": base64.b64encode(b"\0" * 8).decode()}},
        )
    )
    hub.fail_next("/commit/", status=503, times=2)
    statuses = [_call(hub, "POST", "/api/models/user/name/commit/dev", body=commit)[0] for _ in range(3)]
    assert statuses == [503, 503, 200] and [r.status for r in hub.requests[-3:]] == statuses
    assert hub.files("user/name", "dev") == {"w.safetensors": b"\0" * 8} and hub.files("user/name") == {}
    sha = json.loads(_call(hub, "GET", "/api/models/user/name/revision/dev")[2])["sha"]
    assert _call(hub, "GET", f"/user/name/resolve/{sha}/w.safetensors")[2] == b"\0" * 8
    assert _call(hub, "HEAD", f"/user/name/resolve/{sha}/missing.json")[1]["X-Error-Code"] == "EntryNotFound"

    hub.fail_next("/commit/", status=500, times=5)
    hub.clear_failures()
    hub.clear_requests()
    assert _call(hub, "POST", "/api/models/user/name/commit/dev", body=commit)[0] == 200
    assert [r.status for r in hub.requests] == [200]


def test_patch_client_points_huggingface_hub_here_and_restores_offline_mode(hub, tmp_path):
    import huggingface_hub.constants as constants
    from huggingface_hub import HfApi

    hub.add_repo("user/name", {"a.txt": b"a"})
    with hub.patch_client(cache_dir=tmp_path):
        assert HfApi().model_info("user/name").sha == json.loads(_call(hub, "GET", "/api/models/user/name")[2])["sha"]
    assert constants.HF_HUB_OFFLINE and constants.ENDPOINT != hub.url
    assert hub.client_env(tmp_path, token=False)["HF_TOKEN"] == "" and hub.client_env()["HF_ENDPOINT"] == hub.url
