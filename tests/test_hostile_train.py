"""Hostile input for `train`: every row is one clear line (or a correct success), and nothing the user owns changes.

Each row of a table is (id, set-up, flags, exit code, a phrase the message must hold, what must be on disk after).
Before-load rows run `train.main` in-process with the tokenizer and the model loader replaced by a tripwire, so
they prove that the failure came before anything heavy: a row that passes every check reaches the tripwire
(``LOADS``). Checkpoint rows start from one real, tiny training run (module fixture), copied and damaged per row.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hf_lora_recipe.commands.train import main as train_main
from hf_lora_recipe.model import loading as modeling
from hf_lora_recipe.templates import tokenizer


LOADS = -1  # expected "exit code" of a row whose checks all pass: it reaches the tokenizer / model tripwire


class ReachedLoading(Exception):
    """Raised by the tripwire in place of loading a tokenizer or a model."""


def _train_flags(base: Path, data: Path) -> list[str]:
    return [
        "--model_name_or_path",
        str(base),
        "--dataset_name",
        str(data),
        "--max_steps",
        "2",
        "--save_steps",
        "1",
        "--load_in_4bit",
        "false",
        "--bf16",
        "false",
        "--max_length",
        "64",
        "--global_batch_size",
        "4",
    ]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file (sha256) and folder under ``root``: a row that must change nothing compares two of these."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_symlink():
            found[relative] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            found[relative] = "dir"
        else:
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


@dataclass
class Ctx:
    tmp: Path
    base: Path
    data: Path
    run: Path  # a finished run's output_dir (the module fixture's), for rows that copy it
    out: Path = field(init=False)

    def __post_init__(self):
        self.out = self.tmp / "out"

    def copy_run(self, *, without_final: bool = False) -> Path:
        shutil.copytree(self.run, self.out, symlinks=True)
        if without_final:  # as if the run died before its final adapter was published
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                (self.out / name).unlink()
        return self.out


@dataclass
class Case:
    id: str
    setup: Callable[[Ctx], list[str]]  # prepares the files; returns the flags added to the row's train flags
    code: int  # exit code, or LOADS
    phrase: str  # in the error line (code 2), or in stdout/stderr otherwise
    after: Callable[[Ctx, dict, dict], None] | None = None  # (ctx, snapshot before, after); default: nothing changed


def _unchanged(ctx: Ctx, before: dict, after: dict) -> None:
    assert after == before


# ---------------------------------------------------------------- set-ups


def _user_readme(ctx: Ctx) -> list[str]:
    ctx.out.mkdir()
    (ctx.out / "README.md").write_text("# my notes\n\nNever overwrite me.\n")
    return ["--output_dir", str(ctx.out)]


def _user_readme_beside_our_run(ctx: Ctx) -> list[str]:
    ctx.copy_run()
    (ctx.out / "README.md").write_text("---\ntags: [mine]\n---\n# my card\n")
    return ["--output_dir", str(ctx.out), "--max_steps", "3"]


def _stray_files(ctx: Ctx) -> list[str]:
    (ctx.out / "data").mkdir(parents=True)
    (ctx.out / "notes.txt").write_text("mine\n")
    return ["--output_dir", str(ctx.out)]


def _model_folder(ctx: Ctx) -> list[str]:
    shutil.copytree(ctx.base, ctx.out)  # a base model's folder given as output_dir: its names are not ours
    return ["--output_dir", str(ctx.out)]


def _link_inside(ctx: Ctx) -> list[str]:
    ctx.out.mkdir()
    (ctx.tmp / "secret.txt").write_text("elsewhere\n")
    (ctx.out / "recipe.yaml").symlink_to(ctx.tmp / "secret.txt")
    return ["--output_dir", str(ctx.out)]


def _output_is_file(ctx: Ctx) -> list[str]:
    ctx.out.write_text("a file\n")
    return ["--output_dir", str(ctx.out)]


def _output_under_file(ctx: Ctx) -> list[str]:
    ctx.out.write_text("a file\n")
    return ["--output_dir", str(ctx.out / "run")]


def _tilde_output(ctx: Ctx) -> list[str]:
    os.environ["HOME"] = str(ctx.tmp)  # restored by the test
    ctx.out.write_text("a file\n")
    return ["--output_dir", "~/out"]


def _flags(*flags: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ["--output_dir", str(ctx.out), *flags]


def _unknown_architecture(ctx: Ctx) -> list[str]:
    model = ctx.tmp / "model"
    model.mkdir()
    config = json.loads((ctx.base / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "foo_arch"}))
    return ["--output_dir", str(ctx.out), "--model_name_or_path", str(model)]


def _no_config(ctx: Ctx) -> list[str]:
    (ctx.tmp / "model").mkdir()
    (ctx.tmp / "model" / "model.safetensors").write_bytes(b"")
    return ["--output_dir", str(ctx.out), "--model_name_or_path", str(ctx.tmp / "model")]


def _rerun(ctx: Ctx) -> list[str]:
    ctx.copy_run()
    return ["--output_dir", str(ctx.out)]


def _other_base(ctx: Ctx, what: str) -> list[str]:
    """The run's base copied, then changed: a config value, or the weights' layout (one tensor's dtype)."""
    base = ctx.tmp / "other-base"
    shutil.copytree(ctx.base, base)
    if what == "config":
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    else:
        from safetensors.torch import load_file, save_file

        tensors = load_file(base / "model.safetensors")
        first = sorted(tensors)[0]
        save_file({**tensors, first: tensors[first].double()}, base / "model.safetensors", metadata={"format": "pt"})
    return [*_rerun(ctx), "--max_steps", "3", "--model_name_or_path", str(base)]


def _replaced_data(ctx: Ctx) -> list[str]:
    """The training file replaced at its path since the checkpoint (a streamed file, too): the checkpoint's record
    holds the digest of what it was trained on, which the file no longer has."""
    ctx.copy_run()
    for marker in ctx.out.glob("checkpoint-*/hf_lora_recipe.json"):
        state = json.loads(marker.read_text())
        state["identity"]["data"]["version"] = "local files, sha256 0123456789abcdef"
        marker.write_text(json.dumps(state))
    return ["--output_dir", str(ctx.out), "--max_steps", "3"]


def _damaged(name: str, how: str) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        ctx.copy_run(without_final=True)
        path = ctx.out / "checkpoint-2" / name
        _truncate(path) if how == "truncate" else path.unlink()
        return ["--output_dir", str(ctx.out)]

    return setup


def _interrupted(ctx: Ctx) -> list[str]:
    """What a killed run leaves: checkpoints, TensorBoard's folder and (before this fix) TRL's draft card."""
    ctx.out.mkdir()
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        shutil.copytree(ctx.run / checkpoint, ctx.out / checkpoint)
    (ctx.out / "runs").mkdir()
    (ctx.out / "README.md").write_text(
        "---\ntags: [trl, sft]\n---\n# Model Card for run\n\n"
        "It has been trained using [TRL](https://github.com/huggingface/trl).\n"
    )
    return ["--output_dir", str(ctx.out)]


def _all_damaged(ctx: Ctx) -> list[str]:
    ctx.copy_run(without_final=True)
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        (ctx.out / checkpoint / "hf_lora_recipe.json").unlink()
    return ["--output_dir", str(ctx.out)]


def _explicit_damaged(ctx: Ctx) -> list[str]:
    ctx.copy_run(without_final=True)
    _truncate(ctx.out / "checkpoint-2" / "adapter_model.safetensors")
    return ["--output_dir", str(ctx.out), "--resume_from_checkpoint", str(ctx.out / "checkpoint-2")]


def _final_without_checkpoints(ctx: Ctx) -> list[str]:
    ctx.copy_run()
    for checkpoint in ctx.out.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    return ["--output_dir", str(ctx.out)]


# ---------------------------------------------------------------- what must hold afterwards


def _set_aside(reason: str) -> Callable[[Ctx, dict, dict], None]:
    def check(ctx: Ctx, before: dict, after: dict) -> None:
        moved = {
            k.replace("checkpoint-2", "incomplete-checkpoint-2", 1): v
            for k, v in before.items()
            if k.startswith("out/checkpoint-2")
        }
        kept = {k: v for k, v in before.items() if not k.startswith("out/checkpoint-2")}
        assert after == {**kept, **moved}  # renamed, byte for byte; nothing else touched
        assert not (ctx.out / "checkpoint-2").exists()

    return check


def _both_set_aside(ctx: Ctx, before: dict, after: dict) -> None:
    names = sorted(p.name for p in ctx.out.glob("*checkpoint-*"))
    assert names == ["incomplete-checkpoint-1", "incomplete-checkpoint-2"]
    assert len(after) == len(before)


ERRORS = [  # before anything loads: exit code 2, one line
    Case("user-readme-in-output-dir", _user_readme, 2, "README.md (not a model card written by hf-lora-recipe)"),
    Case("user-readme-beside-our-checkpoints", _user_readme_beside_our_run, 2, "README.md (not a model card"),
    Case("stray-files-in-output-dir", _stray_files, 2, "did not write: data/, notes.txt; training would overwrite"),
    Case("output-dir-is-a-model-folder", _model_folder, 2, "config.json"),
    Case("symlink-in-output-dir", _link_inside, 2, "recipe.yaml (a symbolic link)"),
    Case("output-dir-is-a-file", _output_is_file, 2, "is a file, not a folder: choose another output_dir"),
    Case("output-dir-under-a-file", _output_under_file, 2, "cannot be created"),
    Case("tilde-output-dir-is-expanded", _tilde_output, 2, "/out is a file"),
    Case(
        "unknown-scheduler",
        _flags("--lr_scheduler_type", "cosin"),
        2,
        "'cosin' is not a name transformers knows; did you mean 'cosine'?",
    ),
    Case(
        "unknown-optimizer",
        _flags("--optim", "adamw"),
        2,
        "optim: 'adamw' is not a name transformers knows; did you mean 'adamw_torch'?",
    ),
    Case(
        "target-matches-nothing",
        _flags("--lora_target_modules", "q_proj,qkv_proj"),
        2,
        "qkv_proj matches no module of LlamaForCausalLM (nearest: ",
    ),
    Case(
        "target-is-not-linear", _flags("--lora_target_modules", "mlp"), 2, "mlp (LlamaMLP) cannot carry a LoRA adapter"
    ),
    Case(
        "unknown-attention",
        _flags("--attn_implementation", "sdpaa"),
        2,
        "attn_implementation 'sdpaa' is not an attention transformers 5.",
    ),
    Case(
        "rank-above-every-target",
        _flags("--lora_r", "256", "--lora_alpha", "512"),
        2,
        "lora_r 256 exceeds every target's min(in, out) (q_proj 64, ",
    ),
    Case("missing-local-model", _flags("--model_name_or_path", "/nonexistent/llama"), 2, "no such folder"),
    Case("malformed-hub-id", _flags("--model_name_or_path", "meta-llama//Llama 3"), 2, "not a Hub model id"),
    Case(
        "hub-id-not-cached-offline",
        _flags("--model_name_or_path", "nobody-here/no-such-model"),
        2,
        "not in the local cache while HF_HUB_OFFLINE=1",
    ),
    Case("unknown-architecture", _unknown_architecture, 2, "model_type 'foo_arch', which transformers"),
    Case("model-folder-without-config", _no_config, 2, "no config.json in that folder"),
    Case(
        "resume-from-missing-path",
        _flags("--resume_from_checkpoint", "/nonexistent/checkpoint-9"),
        2,
        "is not a checkpoint directory",
    ),
    Case(
        "explicit-damaged-checkpoint",
        _explicit_damaged,
        2,
        "checkpoint-2 cannot be resumed from: adapter_model.safetensors is truncated",
    ),
    Case(
        "finished-adapter-without-checkpoints",
        _final_without_checkpoints,
        2,
        "already holds a finished adapter and no checkpoint to resume from: pass --overwrite_output_dir true",
    ),
    Case(
        "checkpoint-past-max-steps",
        lambda ctx: [*_rerun(ctx), "--max_steps", "1"],
        2,
        "is at step 2, past max_steps 1",
    ),
    # a resume compares what the checkpoint was trained on before loading: refused changes name old -> new
    Case(
        "resume-with-another-rank",
        lambda ctx: [*_rerun(ctx), "--max_steps", "3", "--lora_r", "8"],
        2,
        "checkpoint-2 was trained with another recipe (lora_r 16 -> 8): resume with the recipe",
    ),
    Case(
        "resume-with-other-adapter-and-optimizer-keys",
        lambda ctx: [*_rerun(ctx), "--max_steps", "3", "--use_dora", "true", "--learning_rate", "1e-4"],
        2,
        "(use_dora False -> True; learning_rate 0.0003 -> 0.0001)",
    ),
    Case(
        "resume-with-other-targets",
        lambda ctx: [*_rerun(ctx), "--max_steps", "3", "--lora_target_modules", "q_proj,v_proj"],
        2,
        "lora_target_modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj -> q_proj,v_proj",
    ),
    Case(
        "resume-with-another-init",
        lambda ctx: [*_rerun(ctx), "--max_steps", "3", "--init_lora_weights", "gaussian"],
        2,
        "init_lora_weights true -> gaussian",
    ),
    Case(
        "resume-with-another-global-batch",
        lambda ctx: [*_rerun(ctx), "--max_steps", "3", "--global_batch_size", "8"],
        2,
        "global_batch_size 4 -> 8",
    ),
    Case("resume-on-another-base", lambda ctx: _other_base(ctx, "config"), 2, "base config_sha256 "),
    Case("resume-on-reshaped-weights", lambda ctx: _other_base(ctx, "weights"), 2, "base weights_layout_sha256 "),
    Case(
        "resume-on-replaced-data-file",
        _replaced_data,
        2,
        "checkpoint-2 was trained on other data (data version local files, sha256 0123456789abcdef -> local files",
    ),
    Case(
        "resume-on-another-data-layout",
        lambda ctx: [*_rerun(ctx), "--max_steps", "3", "--max_length", "32"],
        2,
        "was trained on other data (max_length 64 -> 32): pass --allow_data_change true",
    ),
]

PASSES = [  # checks pass; the row either finishes without loading (0) or reaches the loaders (LOADS)
    Case(
        "all-linear-accepted", _flags("--lora_target_modules", "all-linear"), LOADS, "LoRA on 14 modules (all-linear)"
    ),
    Case("rerun-of-a-finished-run", _rerun, 0, "run complete: "),
    Case(
        "newest-checkpoint-without-marker",
        _damaged("hf_lora_recipe.json", "unlink"),
        LOADS,
        "checkpoint-2: no hf_lora_recipe.json: its save did not finish",
        _set_aside("marker"),
    ),
    Case(
        "truncated-trainer-state",
        _damaged("trainer_state.json", "truncate"),
        LOADS,
        "checkpoint-2: trainer_state.json is unreadable, truncated or corrupt",
        _set_aside("state"),
    ),
    Case(
        "truncated-optimizer",
        _damaged("optimizer.pt", "truncate"),
        LOADS,
        "checkpoint-2: optimizer.pt is truncated",
        _set_aside("optimizer"),
    ),
    Case(
        "resume-with-allowed-changes",
        lambda ctx: [*_rerun(ctx), "--max_steps", "3", "--logging_steps", "1", "--save_steps", "5"],
        LOADS,
        "resuming checkpoint-2 with changes: max_steps 2 -> 3; logging_steps 10 -> 1; save_steps 1 -> 5",
    ),
    Case(
        "resume-on-replaced-data-when-allowed",
        lambda ctx: [*_replaced_data(ctx), "--allow_data_change", "true"],
        LOADS,
        "resuming checkpoint-2 with changes: data version local files, sha256 ",
    ),
    Case("every-checkpoint-incomplete", _all_damaged, LOADS, "incomplete-checkpoint-1", _both_set_aside),
    Case("rerun-of-an-interrupted-run", _interrupted, LOADS, "resuming from "),
]


@pytest.fixture(scope="module")
def finished_run(tiny_base, alpaca_path, tmp_path_factory):
    """One real run: 2 steps, a checkpoint after each; logging_steps (10) > steps run."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert train_main([*_train_flags(tiny_base, alpaca_path), "--output_dir", str(output_dir)]) == 0
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return output_dir


@pytest.fixture
def tripwire(monkeypatch):
    def refuse(*args, **kwargs):
        raise ReachedLoading

    monkeypatch.setattr(tokenizer, "tokenizer_for", refuse)
    monkeypatch.setattr(modeling, "load_base_model", refuse)


def _run_row(case: Case, ctx: Ctx, capsys) -> tuple[int, str, str]:
    flags = case.setup(ctx)
    before = _snapshot(ctx.tmp)
    capsys.readouterr()
    if case.code == LOADS:
        with pytest.raises(ReachedLoading):
            train_main([*_train_flags(ctx.base, ctx.data), *flags])
        code = LOADS
    else:
        code = train_main([*_train_flags(ctx.base, ctx.data), *flags])
    out, err = capsys.readouterr()
    assert code == case.code, err
    assert "Traceback" not in out + err
    (case.after or _unchanged)(ctx, before, _snapshot(ctx.tmp))
    return code, out, err


@pytest.mark.parametrize("case", ERRORS, ids=[c.id for c in ERRORS])
def test_fails_before_loading_with_one_line(
    case, tiny_base, alpaca_path, finished_run, tmp_path, capsys, tripwire, monkeypatch
):
    monkeypatch.setenv("HOME", os.environ["HOME"])  # _tilde_output changes it
    _, _, err = _run_row(case, Ctx(tmp_path, tiny_base, alpaca_path, finished_run), capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-lora-recipe: error: "), err
    assert case.phrase in lines[0], lines[0]
    if case.id == "tilde-output-dir-is-expanded":
        assert str(tmp_path / "out") in lines[0]


@pytest.mark.parametrize("case", PASSES, ids=[c.id for c in PASSES])
def test_checks_pass_and_say_what_they_decided(case, tiny_base, alpaca_path, finished_run, tmp_path, capsys, tripwire):
    _, out, err = _run_row(case, Ctx(tmp_path, tiny_base, alpaca_path, finished_run), capsys)
    assert case.phrase in out + err, out + err
    if case.code == LOADS and case.id.startswith(("newest", "truncated")):
        assert f"resuming from {tmp_path / 'out' / 'checkpoint-1'}" in out  # the newest complete one
    if case.id == "rerun-of-a-finished-run":
        assert "--max_steps" in out and "--overwrite_output_dir true" in out
    if case.id == "rerun-of-an-interrupted-run":
        assert f"resuming from {tmp_path / 'out' / 'checkpoint-2'}" in out
    if case.id == "every-checkpoint-incomplete":
        assert "resuming" not in out  # a fresh start, the incomplete ones kept aside


def _read_only_dir() -> Path:
    """A folder the test process cannot write into (as root, only while its effective uid is dropped)."""
    parent = Path(tempfile.mkdtemp(prefix="hf-lora-ro-"))
    parent.chmod(0o755)
    (parent / "ro").mkdir()
    (parent / "ro" / "kept.txt").write_text("mine\n")
    (parent / "ro").chmod(0o555)
    return parent / "ro"


@pytest.mark.parametrize("where", ["output_dir", "its parent"])
def test_read_only_output_dir_fails_before_loading(where, tiny_base, alpaca_path, capsys, tripwire):
    importlib.import_module("hf_lora_recipe.shipping.output_dir")  # imported now: nothing is read while unprivileged

    read_only = _read_only_dir()
    output_dir = read_only if where == "output_dir" else read_only / "run"
    as_root = os.geteuid() == 0
    try:
        if as_root:
            os.seteuid(65534)  # root writes anywhere: check as an ordinary user would run it
        code = train_main([*_train_flags(tiny_base, alpaca_path), "--output_dir", str(output_dir)])
    finally:
        if as_root:
            os.seteuid(0)
        read_only.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("hf-lora-recipe: error: ")
    expected = (
        "is not writable (Permission denied)" if where == "output_dir" else f"cannot be created: {read_only} is not"
    )
    assert expected in err
    assert sorted(p.name for p in read_only.iterdir()) == ["kept.txt"]
    shutil.rmtree(read_only.parent)


def test_the_finished_run_reports_a_loss_and_writes_only_our_card(finished_run):
    results = json.loads((finished_run / "training_results.json").read_text())
    assert results["optimizer_steps"] == 2
    assert isinstance(results["final_train_loss"], float)  # logging_steps 10 > 2 steps: the run's mean, not null
    card = (finished_run / "README.md").read_text()
    assert "hf-lora-recipe" in card and "It has been trained using [TRL]" not in card
    assert str(finished_run) in card  # the absolute output_dir, as the recipe resolved it
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        assert json.loads((finished_run / checkpoint / "hf_lora_recipe.json").read_text())["world_size"] == 1


def test_a_truncated_newest_checkpoint_is_set_aside_and_the_rerun_finishes(
    finished_run, tmp_path, tiny_base, alpaca_path, capsys, keep_signal_handlers
):
    """A disk that filled during the last checkpoint save: the rerun resumes from the one before and finishes."""
    ctx = Ctx(tmp_path, tiny_base, alpaca_path, finished_run)
    ctx.copy_run(without_final=True)
    _truncate(ctx.out / "checkpoint-2" / "adapter_model.safetensors")
    damaged = (ctx.out / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
    assert train_main([*_train_flags(tiny_base, alpaca_path), "--output_dir", str(ctx.out)]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert f"skipped {ctx.out / 'checkpoint-2'}: adapter_model.safetensors is truncated or corrupt" in err
    assert "set aside as incomplete-checkpoint-2" in err
    assert f"resuming from {ctx.out / 'checkpoint-1'}" in out
    assert (
        ctx.out / "incomplete-checkpoint-2" / "adapter_model.safetensors"
    ).read_bytes() == damaged  # kept as it was
    assert json.loads((ctx.out / "training_results.json").read_text())["optimizer_steps"] == 2
    assert (ctx.out / "adapter_model.safetensors").is_file()


def test_a_run_that_trained_to_the_end_but_never_published_writes_its_adapter_without_training(
    finished_run, tmp_path, tiny_base, alpaca_path, capsys, keep_signal_handlers
):
    from safetensors.torch import load_file

    ctx = Ctx(tmp_path, tiny_base, alpaca_path, finished_run)
    ctx.copy_run(without_final=True)
    assert train_main([*_train_flags(tiny_base, alpaca_path), "--output_dir", str(ctx.out)]) == 0
    out, err = capsys.readouterr()
    assert "writing it from that checkpoint, without training" in out and "Traceback" not in err
    assert json.loads((ctx.out / "training_results.json").read_text())["optimizer_steps"] == 2  # not 3
    assert not (ctx.out / "checkpoint-3").exists()
    final = load_file(ctx.out / "adapter_model.safetensors")
    saved = load_file(ctx.out / "checkpoint-2" / "adapter_model.safetensors")
    assert final.keys() == saved.keys() and all((final[k] == saved[k]).all() for k in final)


def test_paths_are_expanded_and_made_absolute_once_when_the_recipe_loads(tmp_path, monkeypatch):
    from hf_lora_recipe.recipe.schema import load_recipe

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(
        None,
        {
            "output_dir": "~/runs/a",
            "resume_from_checkpoint": "~/runs/a/checkpoint-4",
            "model_name_or_path": "~/models/base",
            "dataset_name": "~/data.jsonl",
        },
    )
    assert recipe.output_dir == str(tmp_path / "runs" / "a")
    assert recipe.resume_from_checkpoint == str(tmp_path / "runs" / "a" / "checkpoint-4")
    assert recipe.model_name_or_path == str(tmp_path / "models/base")
    assert recipe.dataset_name == str(tmp_path / "data.jsonl")
    relative = load_recipe(
        None, {"output_dir": "out", "resume_from_checkpoint": "true", "model_name_or_path": "org/model"}
    )
    assert relative.output_dir == str(tmp_path / "out") and relative.resume_from_checkpoint == "true"
    assert relative.model_name_or_path == "org/model"  # a Hub id stays one


@pytest.mark.parametrize(
    "size, phrase",
    [("100000", "eval_split_size 100000 holds out 100000 of the "), ("0.99999999", "eval_split_size 1 holds out")],
    ids=["count-holds-out-every-row", "share-leaves-no-training-row"],
)
def test_an_eval_split_that_leaves_a_side_empty_stops_before_the_model(
    size, phrase, tiny_base, alpaca_path, tmp_path, capsys, monkeypatch
):
    """The held-out count needs the examples, so it is checked once they are built: still before the base loads."""
    monkeypatch.setattr(modeling, "load_base_model", lambda *args, **kwargs: pytest.fail("the base loaded"))
    output_dir = tmp_path / "out"
    code = train_main(
        [*_train_flags(tiny_base, alpaca_path), "--output_dir", str(output_dir), "--eval_split_size", size]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hf-lora-recipe: error: ") and phrase in lines[0]
    assert not output_dir.exists() or not any(output_dir.iterdir())


def test_an_allowed_change_is_recorded_in_checkpoints_results_and_card(tiny_base, alpaca_path, finished_run, tmp_path):
    """Resumed on changed data (allowed) and a raised max_steps: the next checkpoint, training_results.json and the
    card record the change and the data trained on before; a later plain resume keeps the record."""
    ctx = Ctx(tmp_path, tiny_base, alpaca_path, finished_run)
    flags = [*_replaced_data(ctx), "--allow_data_change", "true"]
    assert train_main([*_train_flags(tiny_base, alpaca_path), *flags]) == 0
    results = json.loads((ctx.out / "training_results.json").read_text())
    [record] = results["resumes"]
    assert record["checkpoint"] == "checkpoint-2" and record["step"] == 2
    assert record["changes"][0].startswith("data version local files, sha256 0123456789abcdef -> local files, sha256")
    assert record["changes"][1] == "max_steps 2 -> 3"
    assert record["data_before"] == {"name": alpaca_path.name, "version": "local files, sha256 0123456789abcdef"}
    card = (ctx.out / "README.md").read_text()
    assert "- resumed at step 2 with changes: data version local files, sha256 0123456789abcdef -> local" in card
    assert f"(steps up to 2 trained on `{alpaca_path.name}`, local files, sha256 0123456789abcdef)" in card
    marker = json.loads((ctx.out / "checkpoint-3" / "hf_lora_recipe.json").read_text())
    assert marker["resumes"] == results["resumes"] and marker["identity"]["recipe"]["max_steps"] == 3

    assert train_main([*_train_flags(tiny_base, alpaca_path), "--output_dir", str(ctx.out), "--max_steps", "4"]) == 0
    later = json.loads((ctx.out / "training_results.json").read_text())["resumes"]
    assert [entry["changes"] for entry in later] == [record["changes"], ["max_steps 3 -> 4"]]
    assert str(tmp_path) not in json.dumps(later) and str(alpaca_path.parent) not in json.dumps(later)
