"""The local Hub of tests/hub_server.py, exercised only through the real huggingface_hub client over HTTP.

The suite runs with HF_HUB_OFFLINE=1 (tests/conftest.py), which huggingface_hub freezes into
``huggingface_hub.constants.HF_HUB_OFFLINE`` at import (the env var changed later is ignored, see
``test_offline_flag_and_endpoint_are_read_at_import``). In this process the ``online`` fixture uses
``server.patch_client()``, which patches the module attributes for one test, and the calls still name the
server with ``HfApi(endpoint=...)`` / ``hf_hub_download(endpoint=...)``; transformers / peft have no ``endpoint=``
and rely on the patch alone. In a subprocess ``server.client_env()`` sets HF_ENDPOINT / HF_HUB_OFFLINE=0 /
HF_TOKEN / HF_HUB_CACHE / HF_HOME before anything imports. Nothing here leaves 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .hub_server import HubServer, git_blob_sha1, start_hub_server

TOKEN = "hf_test_server_token"
UPLOADED = ("README.md", "config.json", "model.safetensors")


@pytest.fixture
def hub():
    with HubServer(TOKEN) as server:
        yield server


@pytest.fixture
def online(hub, tmp_path):
    """Lift the offline mode huggingface_hub froze at import and point its default endpoint at the server, for
    this test only. Lifting offline mode alone is not enough: with telemetry on, the first request of the process
    makes the client's user-agent agent detection GET https://huggingface.co/api/agent-harnesses (patch_client
    disables telemetry). HF_TOKEN is unset: the tests name their token (or token=False) explicitly."""
    with hub.patch_client(cache_dir=tmp_path / "default-cache", token=False):
        yield


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A folder with the three files to publish and two that allow_patterns must leave behind."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (folder / "optimizer.pt").write_bytes(b"not published")
    (folder / "training_args.bin").write_bytes(b"not published either")
    return folder


def _api(hub: HubServer, token=TOKEN):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=token)


def _upload(hub: HubServer, folder: Path, repo_id: str = "user/name", **kwargs):
    return _api(hub).upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Upload model",
                                   allow_patterns=["*.safetensors", "*.json", "README.md"], **kwargs)


def _local(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in UPLOADED}


def test_offline_flag_and_endpoint_are_read_at_import(hub, tmp_path):
    """HF_HUB_OFFLINE / HF_ENDPOINT set after `import huggingface_hub` change nothing; the module attributes do."""
    hub.add_repo("user/seeded", {"a.txt": b"a"})
    script = textwrap.dedent(f"""
        import os
        import huggingface_hub
        from huggingface_hub import HfApi
        from huggingface_hub.errors import OfflineModeIsEnabled
        os.environ["HF_HUB_OFFLINE"] = "0"        # too late: frozen at import
        os.environ["HF_ENDPOINT"] = "{hub.url}"   # too late as well
        print(huggingface_hub.constants.ENDPOINT)
        try:
            HfApi(endpoint="{hub.url}", token="{TOKEN}").model_info("user/seeded")
            print("online")
        except OfflineModeIsEnabled:
            print("offline")
        huggingface_hub.constants.HF_HUB_OFFLINE = False   # read at call time by every request
        print(HfApi(endpoint="{hub.url}", token="{TOKEN}").model_info("user/seeded").sha)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_ENDPOINT", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    endpoint, mode, sha = out.stdout.split()
    assert endpoint == "https://huggingface.co" and mode == "offline"
    assert sha == hub.head("user/seeded")
    assert [r.path for r in hub.requests] == ["/api/models/user/seeded"]


def test_upload_folder_then_download(hub, online, model_dir, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    api = _api(hub)
    url = api.create_repo(repo_id="user/name", private=True, exist_ok=True)
    assert url == f"{hub.url}/user/name"
    assert api.create_repo(repo_id="user/name", private=True, exist_ok=True) == url  # 409 + exist_ok
    info = _upload(hub, model_dir)

    assert hub.is_private("user/name")
    assert hub.files("user/name") == _local(model_dir)
    assert info.oid == hub.head("user/name") and info.commit_url.endswith(f"/user/name/commit/{info.oid}")
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)

    preupload = hub.requests_matching("/preupload/main", "POST")[-1].json()
    assert sorted(f["path"] for f in preupload["files"]) == sorted(UPLOADED)
    (commit,) = hub.requests_matching("/api/models/user/name/commit/main", "POST")
    assert commit.headers["content-type"] == "application/x-ndjson"
    header, *items = commit.ndjson()
    assert header == {"key": "header", "value": {"summary": "Upload model", "description": ""}}
    assert {i["value"]["path"]: base64.b64decode(i["value"]["content"]) for i in items if i["key"] == "file"} \
        == _local(model_dir)
    assert {i["key"] for i in items} == {"file"}  # inline base64: no lfsFile, no xet

    assert sorted(api.list_repo_files("user/name")) == sorted(UPLOADED)
    model_info = api.model_info("user/name")
    assert model_info.sha == info.oid and model_info.private
    assert sorted(s.rfilename for s in model_info.siblings) == sorted(UPLOADED)

    cache = tmp_path / "cache"
    for name in UPLOADED:
        path = hf_hub_download("user/name", name, endpoint=hub.url, cache_dir=cache, token=TOKEN)
        assert Path(path).read_bytes() == (model_dir / name).read_bytes()
        assert f"snapshots/{info.oid}/" in Path(path).as_posix()
    head = hub.requests_matching("/user/name/resolve/main/model.safetensors", "HEAD")[0]
    assert head.status == 200

    snapshot = Path(snapshot_download("user/name", endpoint=hub.url, cache_dir=tmp_path / "snap", token=TOKEN))
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == _local(model_dir)

    # Re-uploading unchanged files makes no commit: preupload returns their oids and the client drops them.
    _upload(hub, model_dir)
    assert len(hub.requests_matching("/commit/main", "POST")) == 1
    assert len(hub.commits("user/name")) == 2  # the initial (empty) commit + the upload


def test_missing_repo_revision_and_file_are_typed_errors(hub, online, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    hub.add_repo("user/name", {"config.json": b"{}"})
    cache = tmp_path / "cache"
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("user/name", "missing.json", endpoint=hub.url, cache_dir=cache, token=TOKEN)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/name", "config.json", revision="nope", endpoint=hub.url, cache_dir=cache, token=TOKEN)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/other", "config.json", endpoint=hub.url, cache_dir=cache, token=TOKEN)
    with pytest.raises(RepositoryNotFoundError):
        _api(hub).model_info("user/other")
    missing = hub.requests_matching("/resolve/main/missing.json")[0]
    assert missing.status == 404


def test_wrong_or_missing_token_is_refused(hub, online, model_dir, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    with pytest.raises(HfHubHTTPError) as error:
        _api(hub, token="hf_wrong").create_repo("user/name")
    assert error.value.response.status_code == 401
    assert not hub.repo_exists("user/name")
    with pytest.raises(HfHubHTTPError) as error:
        _api(hub, token=False).create_repo("user/name")
    assert error.value.response.status_code == 401 and "authorization" not in hub.requests[-1].headers

    _api(hub).create_repo("user/name", private=True)
    with pytest.raises(HfHubHTTPError) as error:
        _api(hub, token="hf_wrong").upload_folder(folder_path=model_dir, repo_id="user/name", commit_message="x")
    assert error.value.response.status_code == 401
    assert hub.files("user/name") == {}

    _upload(hub, model_dir)
    with pytest.raises(RepositoryNotFoundError):  # private: anonymous reads are refused
        hf_hub_download("user/name", "config.json", endpoint=hub.url, cache_dir=tmp_path / "a", token=False)
    with pytest.raises(HfHubHTTPError) as error:
        hf_hub_download("user/name", "config.json", endpoint=hub.url, cache_dir=tmp_path / "b", token="hf_wrong")
    assert error.value.response.status_code == 401

    hub.add_repo("user/public", {"config.json": b"{}"})
    path = hf_hub_download("user/public", "config.json", endpoint=hub.url, cache_dir=tmp_path / "c", token=False)
    assert Path(path).read_bytes() == b"{}"


def test_token_from_hf_token_env_var(hub, online, monkeypatch, model_dir, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # read at call time, unlike HF_ENDPOINT / HF_HUB_OFFLINE
    api = HfApi(endpoint=hub.url)
    api.create_repo("user/name", private=True)
    api.upload_folder(folder_path=model_dir, repo_id="user/name", commit_message="env token",
                      allow_patterns=["*.json"])
    path = hf_hub_download("user/name", "config.json", endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == (model_dir / "config.json").read_bytes()
    assert all(r.token == TOKEN for r in hub.requests)

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(endpoint=hub.url).create_repo("user/other")
    assert error.value.response.status_code == 401


def test_create_commit_is_not_retried_by_the_client(hub, online):
    """A 500 (or a dropped connection) on the commit POST of create_commit raises at once and changes nothing."""
    import httpx2
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    api = _api(hub)
    api.create_repo("user/name")
    head = hub.head("user/name")
    operations = [CommitOperationAdd("config.json", b'{"a": 1}'), CommitOperationAdd("w.safetensors", b"\0" * 64)]

    hub.fail_next("/commit/", status=500)
    with pytest.raises(HfHubHTTPError) as error:
        api.create_commit("user/name", operations=operations, commit_message="push")
    assert error.value.response.status_code == 500
    assert [r.status for r in hub.requests_matching("/commit/", "POST")] == [500]
    assert hub.files("user/name") == {} and hub.head("user/name") == head

    hub.fail_next("/commit/", status=0)  # connection dropped without an answer
    with pytest.raises(httpx2.RemoteProtocolError):
        api.create_commit("user/name", operations=operations, commit_message="push")
    assert hub.files("user/name") == {}

    hub.clear_requests()  # a caller's retry may reuse the operations: their upload mode is kept, no preupload
    api.create_commit("user/name", operations=operations, commit_message="push")
    assert [(r.method, r.status) for r in hub.requests] == [("POST", 200)]
    assert hub.files("user/name") == {"config.json": b'{"a": 1}', "w.safetensors": b"\0" * 64}


def test_client_retries_preupload_download_head_and_upload_folder_commit(hub, online, model_dir, tmp_path):
    from huggingface_hub import CommitOperationAdd, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils._runtime import is_xet_available

    api = _api(hub)
    api.create_repo("user/name")
    hub.fail_next("/preupload/", status=503)  # http_backoff: retried after 1 s
    api.create_commit("user/name", [CommitOperationAdd("a.txt", b"a")], commit_message="a")
    assert [r.status for r in hub.requests_matching("/preupload/")] == [503, 200]

    hub.fail_next("/commit/", status=500)
    if is_xet_available():  # upload_folder -> pipelined upload -> commit POST with retry_on_error=True
        _upload(hub, model_dir)
        assert [r.status for r in hub.requests_matching("/commit/")][-2:] == [500, 200]
        assert set(UPLOADED) <= set(hub.files("user/name"))
    else:  # legacy path: create_commit, no retry
        with pytest.raises(HfHubHTTPError):
            _upload(hub, model_dir)

    hub.fail_next("/resolve/", status=500, method="HEAD")  # second HEAD, with retries, since nothing is cached
    path = hf_hub_download("user/name", "a.txt", endpoint=hub.url, cache_dir=tmp_path / "c1", token=TOKEN)
    assert Path(path).read_bytes() == b"a"
    hub.fail_next("/resolve/", status=500, method="GET")  # the content GET only retries 408 / 429
    with pytest.raises(HfHubHTTPError):
        hf_hub_download("user/name", "a.txt", endpoint=hub.url, cache_dir=tmp_path / "c2", token=TOKEN)


def test_branch_and_revision_upload(hub, online, model_dir, tmp_path):
    from huggingface_hub import hf_hub_download

    api = _api(hub)
    api.create_repo("user/name")
    api.create_branch("user/name", branch="v1", exist_ok=True)
    api.create_branch("user/name", branch="v1", exist_ok=True)  # 409 tolerated
    _upload(hub, model_dir, revision="v1")
    assert hub.files("user/name", "main") == {}
    assert hub.files("user/name", "v1") == _local(model_dir)
    assert {b.name for b in api.list_repo_refs("user/name").branches} == {"main", "v1"}
    path = hf_hub_download("user/name", "config.json", revision="v1", endpoint=hub.url, cache_dir=tmp_path / "c",
                           token=TOKEN)
    assert Path(path).read_bytes() == (model_dir / "config.json").read_bytes()
    assert hub.requests_matching("/api/models/user/name/commit/v1", "POST")[0].status == 200


TINY = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2)


def test_transformers_roundtrip_in_process(hub, tmp_path):
    import huggingface_hub.constants as constants
    import torch
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    model.save_pretrained(tmp_path / "tiny")
    cache = tmp_path / "cache"
    with hub.patch_client(cache_dir=cache):
        api = HfApi()  # endpoint and token from the patched constants / HF_TOKEN
        api.create_repo("user/tiny", private=True, exist_ok=True)
        api.upload_folder(folder_path=tmp_path / "tiny", repo_id="user/tiny", commit_message="tiny")
        loaded = AutoModelForCausalLM.from_pretrained("user/tiny", cache_dir=cache)
    assert constants.HF_HUB_OFFLINE and constants.ENDPOINT != hub.url  # restored
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert hub.files("user/tiny")["model.safetensors"] == (tmp_path / "tiny" / "model.safetensors").read_bytes()
    assert any("/user/tiny/resolve/" in r.path and r.path.endswith("model.safetensors") for r in hub.requests)


SUBPROCESS_SCRIPT = """
import json, sys
from pathlib import Path

import torch
from huggingface_hub import HfApi
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

work, cache = Path(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**json.loads(sys.argv[3])))
model.save_pretrained(work / "tiny")
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(50)}}
backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
backend.pre_tokenizer = pre_tokenizers.Whitespace()
PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
                        ).save_pretrained(work / "tiny")
peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
peft_model.save_pretrained(work / "lora")

api = HfApi()  # HF_ENDPOINT and HF_TOKEN from the environment
for repo, folder in (("user/tiny", "tiny"), ("user/tiny-lora", "lora")):
    api.create_repo(repo_id=repo, private=True, exist_ok=True)
    api.upload_folder(folder_path=work / folder, repo_id=repo, commit_message=f"Upload {folder}")

base = AutoModelForCausalLM.from_pretrained("user/tiny", cache_dir=cache)
tokenizer = AutoTokenizer.from_pretrained("user/tiny", cache_dir=cache)
adapted = PeftModel.from_pretrained(base, "user/tiny-lora", cache_dir=cache)
want, got = peft_model.state_dict(), adapted.state_dict()
print(json.dumps({
    "same_keys": want.keys() == got.keys(),
    "same_weights": all(torch.equal(want[k], got[k]) for k in want),
    "ids": tokenizer("w1 w2 w3").input_ids,
}))
"""


def test_transformers_tokenizer_and_peft_in_subprocess(hub, tmp_path):
    """What a CLI test does: the environment, set before the process starts, points everything at the server."""
    script = tmp_path / "roundtrip.py"
    script.write_text(SUBPROCESS_SCRIPT)
    cache = tmp_path / "cache"
    env = {**os.environ, **hub.client_env(cache_dir=cache)}
    out = subprocess.run([sys.executable, str(script), str(tmp_path), str(cache), json.dumps(TINY)], env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"same_keys": True, "same_weights": True, "ids": [4, 5, 6]}
    for repo, folder in (("user/tiny", "tiny"), ("user/tiny-lora", "lora")):
        local = {p.name: p.read_bytes() for p in (tmp_path / folder).iterdir()}
        assert hub.files(repo) == local and hub.is_private(repo)
    assert all(r.token == TOKEN for r in hub.requests)
    assert {r.path.split("/resolve/")[0] for r in hub.requests if "/resolve/" in r.path} == {"/user/tiny",
                                                                                            "/user/tiny-lora"}


def test_fail_next_counts_and_filters(tmp_path):
    """The hook itself: `times`, the method filter, and nothing stored by a failed request."""
    from huggingface_hub.errors import HfHubHTTPError

    server = start_hub_server(TOKEN)
    try:
        with server.patch_client(cache_dir=tmp_path, token=False):
            api = _api(server)
            server.fail_next("/repos/create", status=503, times=2, method="POST")
            for _ in range(2):
                with pytest.raises(HfHubHTTPError) as error:  # create_repo is not retried by the client
                    api.create_repo("user/name")
                assert error.value.response.status_code == 503
            assert not server.repo_exists("user/name")
            api.create_repo("user/name")
            server.fail_next("/api/models/user/name", status=500, method="DELETE")  # never matches a GET
            assert api.model_info("user/name").sha == server.head("user/name")
        assert [r.status for r in server.requests] == [503, 503, 200, 200]
    finally:
        server.close()


def test_other_endpoints(hub, online):
    from huggingface_hub.hf_api import RepoFile, RepoFolder

    api = _api(hub)
    assert api.whoami()["name"] == "user"
    hub.add_repo("user/name", {"config.json": b"{}", "sub/a.txt": b"a", "sub/deep/b.txt": b"bb"})
    assert {(type(e).__name__, e.path) for e in api.list_repo_tree("user/name")} == {
        ("RepoFile", "config.json"), ("RepoFolder", "sub")}
    assert [e.path for e in api.list_repo_tree("user/name", path_in_repo="sub/deep")] == ["sub/deep/b.txt"]
    infos = api.get_paths_info("user/name", ["config.json", "sub", "missing"])
    assert [(type(e), e.path) for e in infos] == [(RepoFile, "config.json"), (RepoFolder, "sub")]
    assert infos[0].blob_id == git_blob_sha1(b"{}") == "9e26dfeeb6e641a33dae4961196235bdb965b21b"
    assert api.file_exists("user/name", "sub/a.txt") and not api.file_exists("user/name", "nope")
    api.create_tag("user/name", tag="v0.1")
    assert hub.files("user/name", "v0.1") == hub.files("user/name")
    api.delete_file("sub/a.txt", repo_id="user/name")
    assert sorted(hub.files("user/name")) == ["config.json", "sub/deep/b.txt"]
    assert sorted(hub.files("user/name", "v0.1")) == ["config.json", "sub/a.txt", "sub/deep/b.txt"]
    api.update_repo_settings("user/name", private=True)
    assert hub.is_private("user/name")
    api.delete_repo("user/name")
    assert not hub.repo_exists("user/name")
