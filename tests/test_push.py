"""Publishing over real HTTP to a local Hub-compatible server (tests/hub_server.py), never a mocked client."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hf_lora_recipe.shipping.merging import merge

from .conftest import CLI, HUB_TOKEN, REPO_ROOT
from .fixtures import build_adapter_dir


TOKEN = HUB_TOKEN  # the local Hub's (conftest's `hub` fixture)


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory):
    """A finished run's output_dir, built in-process (tests/fixtures.py): random non-zero LoRA, run files and a
    checkpoint-2/ that must not be published. A real training run is pushed in the last test."""
    output_dir = build_adapter_dir(tiny_base, tmp_path_factory.mktemp("push") / "adapter")
    assert (output_dir / "checkpoint-2").is_dir()  # checkpoints exist locally and must not be published
    return output_dir


def _cli(hub, tmp_path, *args: str, token: str | bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **hub.client_env(cache_dir=tmp_path / "client-cache", token=token)}
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)


def _logits(model, input_ids):
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits


def test_push_adapter_round_trip(hub, adapter, tiny_base, tmp_path):
    result = _cli(hub, tmp_path, "push", "--path", str(adapter), "--repo_id", "user/tiny-adapter")
    assert result.returncode == 0, result.stderr[-3000:]
    published = set(hub.files("user/tiny-adapter"))
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "recipe.yaml",
        "training_results.json",
        "training_loss.png",
    } <= published
    assert not [p for p in published if p.startswith("checkpoint") or p.endswith((".bin", ".pt", ".pth", ".pkl"))]
    card = hub.files("user/tiny-adapter")["README.md"].decode()
    assert 'adapter = "user/tiny-adapter"' in card  # the card's load snippet names the repo

    input_ids = torch.tensor([[1, 518, 25580, 29962, 15043, 518, 29914, 25580, 29962]])
    local = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapter), input_ids)
    with hub.patch_client(cache_dir=tmp_path / "cache"):
        remote = _logits(
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), "user/tiny-adapter"), input_ids
        )
    assert torch.equal(local, remote)


def test_push_merged_round_trip(hub, adapter, tmp_path):
    merged = merge(str(adapter), tmp_path / "merged", dtype="float32")
    result = _cli(
        hub, tmp_path, "push", "--path", str(merged), "--repo_id", "user/tiny-merged", "--private", "--revision", "dev"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert hub.is_private("user/tiny-merged") and "model.safetensors" in hub.files("user/tiny-merged", "dev")
    input_ids = torch.tensor([[1, 518, 25580, 29962, 15043]])
    local = _logits(AutoModelForCausalLM.from_pretrained(merged), input_ids)
    with hub.patch_client(cache_dir=tmp_path / "cache"):
        remote = _logits(AutoModelForCausalLM.from_pretrained("user/tiny-merged", revision="dev"), input_ids)
    assert torch.equal(local, remote)


def test_token_is_checked_and_never_leaks(hub, adapter, tmp_path):
    denied = _cli(hub, tmp_path, "push", "--path", str(adapter), "--repo_id", "user/denied", token="hf_wrong_token")
    assert denied.returncode != 0 and not hub.repo_exists("user/denied")
    assert "hf_wrong_token" not in denied.stdout + denied.stderr
    missing = _cli(hub, tmp_path, "push", "--path", str(adapter), "--repo_id", "user/denied", token=False)
    assert missing.returncode == 2 and "no Hugging Face token" in missing.stderr

    hub.clear_requests()
    result = _cli(hub, tmp_path, "push", "--path", str(adapter), "--repo_id", "user/leak-check")
    assert result.returncode == 0, result.stderr[-3000:]
    writes = [r for r in hub.requests if r.method == "POST"]
    assert writes and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in writes)
    assert TOKEN not in result.stdout + result.stderr
    for name, content in hub.files("user/leak-check").items():
        assert TOKEN.encode() not in content, name
    for path in adapter.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_a_failed_request_is_retried_and_the_push_completes(hub, adapter, tmp_path):
    hub.fail_next("/commit/", status=503, times=1)
    result = _cli(hub, tmp_path, "push", "--path", str(adapter), "--repo_id", "user/flaky")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "retry 1/4" in result.stderr
    assert "adapter_model.safetensors" in hub.files("user/flaky")


def test_a_push_that_fails_loses_nothing_and_rerunning_completes_it(hub, adapter, tmp_path):
    before = {p.relative_to(adapter): p.read_bytes() for p in adapter.rglob("*") if p.is_file()}
    hub.fail_next("/commit/", status=500, times=2)
    failed = _cli(hub, tmp_path, "push", "--path", str(adapter), "--repo_id", "user/resumed", "--max_retries", "1")
    assert failed.returncode != 0
    assert "adapter_model.safetensors" not in hub.files("user/resumed")  # the commit is atomic: nothing half-pushed
    assert {p.relative_to(adapter): p.read_bytes() for p in adapter.rglob("*") if p.is_file()} == before
    hub.clear_failures()
    again = _cli(hub, tmp_path, "push", "--path", str(adapter), "--repo_id", "user/resumed")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "adapter_model.safetensors" in hub.files("user/resumed")
