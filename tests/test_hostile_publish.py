"""Hostile input to ``merge`` and ``push`` (issue 11, items 3 and 4): nothing the user owns is lost, nothing leaks.

Each row of :data:`CASES` is one bad input: how it is set up, the command line run on it, the exit code, a phrase
its one ``hf-lora-recipe: error:`` line must hold (for a run that succeeds: a phrase of its output), and what must
hold afterwards - every file a row marks with ``ctx.keep`` byte-identical, the adapter intact, on the Hub nothing
that should not be there. Every row also asserts that stderr holds no traceback and at most one error line.

Commands run in-process (``main(argv)`` with capsys). Push rows speak real HTTP to tests/hub_server.py through
``patch_client``; the dead endpoint is a closed server's port. Refusals load no model: only two rows (and the
``previous_merge`` fixture) run a real merge of the tiny base.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hf_lora_recipe.commands.merge import main as merge_main
from hf_lora_recipe.commands.push import main as push_main
from hf_lora_recipe.recipe.cli_args import ERROR_PREFIX

from .conftest import HUB_TOKEN
from .fixtures import build_adapter_dir
from .hub_server import HubServer, start_hub_server


TOKEN = HUB_TOKEN  # the local Hub's (conftest's `hub` fixture)
WRONG_TOKEN = "hf_wrong_token_must_not_be_printed"
SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- the user's key, never to be uploaded"
ADAPTER_FILES = {
    "adapter_model.safetensors",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "README.md",
    "recipe.yaml",
    "training_results.json",
    "training_loss.png",
}


def tree(path: Path) -> dict[str, Any]:
    """Everything at ``path`` without following links: file bytes, link targets, folder names."""
    if path.is_symlink():
        return {".": f"-> {os.readlink(path)}"}
    if path.is_file():
        return {".": path.read_bytes()}
    found: dict[str, Any] = {}
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            full = Path(root, name)
            relative = str(full.relative_to(path))
            found[relative] = (
                f"-> {os.readlink(full)}" if full.is_symlink() else "<dir>" if full.is_dir() else full.read_bytes()
            )
    return found


@dataclass
class Ctx:
    """What a row's set-up and check work with; ``tmp`` is the row's own folder."""

    tmp: Path
    adapter: Path  # the module's pristine adapter: rows copy it before pointing a command at it
    hub: HubServer
    request: pytest.FixtureRequest
    monkeypatch: pytest.MonkeyPatch
    repo: str = ""
    kept: dict[Path, dict[str, Any]] = field(default_factory=dict)

    def adapter_copy(self, where: str = "adapter") -> Path:
        return Path(shutil.copytree(self.adapter, self.tmp / where, symlinks=True))

    def previous_merge(self, where: str = "merged") -> Path:
        """A copy of a real merged output of ours (float32)."""
        return Path(shutil.copytree(self.request.getfixturevalue("previous_merge"), self.tmp / where, symlinks=True))

    def keep(self, path: Path) -> Path:
        """Snapshot ``path`` now; it must be byte-identical after the command."""
        self.kept[path] = tree(path)
        return path

    def published(self) -> dict[str, bytes]:
        return self.hub.files(self.repo) if self.hub.repo_exists(self.repo) else {}


@dataclass(frozen=True)
class Case:
    id: str
    command: str  # "merge" or "push"
    setup: Callable[[Ctx], list[str]]  # builds the bad input under ctx.tmp; returns the argv
    code: int
    phrase: str
    after: Callable[[Ctx, str, str], None] = lambda ctx, out, err: None  # (ctx, stdout, stderr)
    hub: str = "live"  # push rows: the "live" server, a "dead" endpoint, or "offline" (HF_HUB_OFFLINE=1)
    token: str | bool = True  # as in HubServer.client_env: True = the server's token, False = none


def docs_folder(ctx: Ctx, where: str = "docs") -> Path:
    docs = ctx.tmp / where
    (docs / "photos").mkdir(parents=True)
    (docs / "thesis.docx").write_bytes(b"four years of work")
    (docs / "notes.txt").write_text("do not lose\n")
    (docs / "photos" / "a.jpg").write_bytes(bytes(range(256)))
    return ctx.keep(docs)


def with_adapter(ctx: Ctx, *argv: str) -> list[str]:
    return ["--adapter", str(ctx.keep(ctx.adapter_copy())), *argv]


def nothing_new(*names: str) -> Callable[[Ctx, str, str], None]:
    def check(ctx: Ctx, out: str, err: str) -> None:
        for name in names:
            assert not (ctx.tmp / name).exists(), name
        assert not [p.name for p in ctx.tmp.iterdir() if p.name.startswith(".")], "a staging folder was left"

    return check


def merged_as(dtype: str) -> Callable[[Ctx, str, str], None]:
    def check(ctx: Ctx, out: str, err: str) -> None:
        merged = ctx.tmp / "merged"
        marker = json.loads((merged / ".hf-lora-recipe-merge").read_text())
        assert marker["dtype"] == dtype and set(marker["files"]) == set(os.listdir(merged)) - {".hf-lora-recipe-merge"}
        assert json.loads((merged / "config.json").read_text())["dtype"] == dtype
        assert (merged / "model.safetensors").stat().st_size > 0
        leftovers = [p.name for p in ctx.tmp.iterdir() if p.name not in ("adapter", "secret.json")]
        assert leftovers == ["merged"], leftovers  # no staging folder, no retired one

    return check


# ---------------------------------------------------------------- push set-ups and checks


def stray_files(ctx: Ctx) -> list[str]:
    adapter = ctx.adapter_copy()
    (adapter / "notes.json").write_text('{"api_key": "sk-live-0000"}')
    (adapter / "secrets.txt").write_bytes(SECRET)
    (adapter / ".env").write_bytes(SECRET)
    (adapter / "training_args.bin").write_bytes(b"pickle")
    (adapter / "optimizer.pt").write_bytes(b"pickle")
    (adapter / "last.ckpt").write_bytes(b"pickle")
    ctx.keep(adapter)
    return ["--path", str(adapter), "--repo_id", ctx.repo]


def links_out(ctx: Ctx) -> list[str]:
    adapter = ctx.adapter_copy()
    secret = ctx.tmp / "id_ed25519"
    secret.write_bytes(SECRET)
    (adapter / "leak.json").symlink_to(secret)
    (adapter / "vocab.json").symlink_to(secret)  # an allow-listed name: still a link, still skipped
    (adapter / "docs").symlink_to(ctx.tmp, target_is_directory=True)
    ctx.keep(adapter)
    ctx.keep(secret)
    return ["--path", str(adapter), "--repo_id", ctx.repo]


def only_the_adapter_files(ctx: Ctx, out: str, err: str) -> None:
    published = ctx.published()
    assert set(published) == ADAPTER_FILES, set(published) ^ ADAPTER_FILES
    for name, content in published.items():
        assert SECRET not in content and b"sk-live" not in content and TOKEN.encode() not in content, name


def link_warnings(ctx: Ctx, out: str, err: str) -> None:
    only_the_adapter_files(ctx, out, err)
    for name in ("leak.json", "vocab.json", "docs"):
        assert f"{name}: a symbolic link" in err, name


def stray_files_named(ctx: Ctx, out: str, err: str) -> None:
    only_the_adapter_files(ctx, out, err)
    line = next(line for line in out.splitlines() if "not published" in line)
    for name in (
        ".env",
        "checkpoint-2/",
        "last.ckpt",
        "notes.json",
        "optimizer.pt",
        "secrets.txt",
        "training_args.bin",
    ):
        assert name in line, name


def upload_list_printed(ctx: Ctx, out: str, err: str) -> None:
    published = ctx.published()
    assert set(published) == ADAPTER_FILES | {"eval_results.json"}
    listed = out[out.index("in one commit:") :]
    for name in published:
        assert f"  {name}  " in listed, name
    assert "optimizer.pt" not in published
    assert (
        "--include *.pt matched only files push never publishes (pickles, dot-files, folders, links): optimizer.pt"
        in err
    )


def include_extra(ctx: Ctx) -> list[str]:
    adapter = ctx.adapter_copy()
    (adapter / "eval_results.json").write_text('{"accuracy": 0.5}')
    (adapter / "optimizer.pt").write_bytes(b"pickle")
    return ["--path", str(adapter), "--repo_id", ctx.repo, "--include", "eval_*.json", "--include", "*.pt"]


def published_base(base_id: str | None) -> Callable[[Ctx, str, str], None]:
    """What the Hub holds names ``base_id`` as the base (or none), and no published text names a folder here."""

    def check(ctx: Ctx, out: str, err: str) -> None:
        import yaml

        published = ctx.published()
        assert json.loads(published["adapter_config.json"])["base_model_name_or_path"] == base_id
        recipe = yaml.safe_load(published["recipe.yaml"])
        card = published["README.md"].decode()
        if base_id is None:
            assert recipe["model_name_or_path"] == Path(ctx.request.getfixturevalue("tiny_base")).name
            assert "whose Hub id was not recorded" in card and "base_model:" not in card
        else:
            assert recipe["model_name_or_path"] == base_id and f"base_model: {base_id}" in card
        local = [str(ctx.tmp), str(ctx.adapter.parent), str(Path.cwd()), str(Path.home())]
        local.append(str(ctx.request.getfixturevalue("tiny_base")))
        for name, content in published.items():
            if name.endswith((".json", ".yaml", ".md", ".jinja")):
                text = content.decode()
                assert not [folder for folder in local if folder in text], (name, local)

    return check


def without_recipe(ctx: Ctx, card: bool = True) -> Path:
    adapter = ctx.adapter_copy()
    (adapter / "recipe.yaml").unlink()
    if not card:
        (adapter / "README.md").unlink()
    return ctx.keep(adapter)


def adapter_names_no_base(ctx: Ctx, out: str, err: str) -> None:
    published = ctx.published()
    assert json.loads(published["adapter_config.json"])["base_model_name_or_path"] is None
    base = str(ctx.request.getfixturevalue("tiny_base"))
    assert not [
        name for name, content in published.items() if name.endswith((".json", ".md")) and base.encode() in content
    ]


def with_recipe_key(ctx: Ctx, key: str, value: str) -> Path:
    adapter = ctx.adapter_copy()
    recipe = adapter / "recipe.yaml"
    recipe.write_text(recipe.read_text() + f"{key}: {value}\n")
    return ctx.keep(adapter)


def base_recording(ctx: Ctx, name: str) -> Path:
    """A run whose local base's config.json records the Hub id it came from."""
    base = Path(shutil.copytree(ctx.request.getfixturevalue("tiny_base"), ctx.tmp / "base"))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": name}))
    adapter = ctx.adapter_copy()
    recipe = adapter / "recipe.yaml"
    text = recipe.read_text().replace(str(ctx.request.getfixturevalue("tiny_base")), str(base))
    recipe.write_text(text)
    return ctx.keep(adapter)


def local_path_in_extra(ctx: Ctx) -> list[str]:
    adapter = ctx.adapter_copy()
    (adapter / "notes.txt").write_text(f"trained from {adapter}/checkpoint-2\n")
    return ["--path", str(ctx.keep(adapter)), "--repo_id", ctx.repo, "--include", "notes.txt"]


def extra_chat_templates(ctx: Ctx) -> list[str]:
    adapter = ctx.adapter_copy()
    templates = adapter / "additional_chat_templates"
    templates.mkdir()
    (templates / "tool_use.jinja").write_text("{{ messages }}")
    (templates / "notes.txt").write_text("mine")
    (templates / "rag.jinja").symlink_to(ctx.tmp / "elsewhere.jinja")
    (ctx.tmp / "elsewhere.jinja").write_bytes(SECRET)
    return ["--path", str(ctx.keep(adapter)), "--repo_id", ctx.repo]


def chat_templates_published(ctx: Ctx, out: str, err: str) -> None:
    published = ctx.published()
    assert set(published) == ADAPTER_FILES | {"additional_chat_templates/tool_use.jinja"}
    assert "additional_chat_templates/rag.jinja: a symbolic link" in err
    assert "additional_chat_templates/notes.txt" in next(line for line in out.splitlines() if "not published" in line)


def no_request(ctx: Ctx, out: str, err: str) -> None:
    assert not ctx.hub.requests, [r.path for r in ctx.hub.requests]


def token_not_shown(ctx: Ctx, out: str, err: str) -> None:
    assert not ctx.hub.repo_exists(ctx.repo)
    assert WRONG_TOKEN not in out + err and TOKEN not in out + err
    assert "`hf auth login`" in err


def failing_commit(ctx: Ctx) -> list[str]:
    ctx.hub.fail_next("/commit/", status=500, times=2)
    return ["--path", str(ctx.keep(ctx.adapter_copy())), "--repo_id", ctx.repo, "--max_retries", "1"]


def nothing_committed(ctx: Ctx, out: str, err: str) -> None:
    assert "adapter_model.safetensors" not in ctx.published()


def pushable(ctx: Ctx, *extra: str) -> list[str]:
    return ["--path", str(ctx.keep(ctx.adapter_copy())), "--repo_id", ctx.repo, *extra]


def fake_merge_of_ours_without_marker(ctx: Ctx) -> list[str]:
    merged = ctx.previous_merge()
    (merged / ".hf-lora-recipe-merge").unlink()  # written before the marker existed: recognised by its card
    return with_adapter(ctx, "--output", str(ctx.keep(merged)))


def tilde_output(ctx: Ctx) -> list[str]:
    home = ctx.tmp / "home"
    home.mkdir()
    ctx.monkeypatch.setenv("HOME", str(home))
    docs_folder(ctx, "home/docs")
    return with_adapter(ctx, "--output", "~/docs")


def adapter_with_config(ctx: Ctx, text: str) -> Path:
    adapter = ctx.adapter_copy()
    (adapter / "adapter_config.json").write_text(text)
    return ctx.keep(adapter)


def missing_base(ctx: Ctx) -> list[str]:
    adapter = ctx.adapter_copy()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(ctx.tmp / "deleted-base")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return ["--adapter", str(ctx.keep(adapter)), "--output", str(ctx.tmp / "merged")]


def other_base(ctx: Ctx, **changes: Any) -> list[str]:
    """A base folder (config.json only: nothing loads) whose architecture differs from the adapter's base."""
    base = ctx.tmp / "other-base"
    base.mkdir()
    config = json.loads((Path(ctx.request.getfixturevalue("tiny_base")) / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, **changes}))
    return ["--adapter", str(ctx.keep(ctx.adapter_copy())), "--base", str(base), "--output", str(ctx.tmp / "m")]


def a_file(ctx: Ctx, name: str, content: bytes = b"the user's file") -> Path:
    (ctx.tmp / name).write_bytes(content)
    return ctx.keep(ctx.tmp / name)


def link_to_documents(ctx: Ctx) -> list[str]:
    (ctx.tmp / "link").symlink_to(docs_folder(ctx), target_is_directory=True)
    return with_adapter(ctx, "--output", str(ctx.keep(ctx.tmp / "link")))


def our_merge_holding_a_user_file(ctx: Ctx) -> list[str]:
    merged = ctx.previous_merge()
    (merged / "my-notes.md").write_text("written by the user after the merge\n")
    return with_adapter(ctx, "--output", str(ctx.keep(merged)), "--overwrite")


def over_our_merge(ctx: Ctx) -> list[str]:
    ctx.previous_merge()  # float32; the new one is bfloat16
    return with_adapter(ctx, "--output", str(ctx.tmp / "merged"), "--overwrite")


def into_empty_folder_from_adapter_with_a_link(ctx: Ctx) -> list[str]:
    (ctx.tmp / "merged").mkdir()
    adapter = ctx.adapter_copy()
    (adapter / "training_results.json").unlink()
    (adapter / "training_results.json").symlink_to(a_file(ctx, "secret.json", SECRET))
    return ["--adapter", str(ctx.keep(adapter)), "--output", str(ctx.tmp / "merged")]


def merged_without_the_link(ctx: Ctx, out: str, err: str) -> None:
    merged_as("bfloat16")(ctx, out, err)
    assert not (ctx.tmp / "merged" / "training_results.json").exists()
    assert "training_results.json is a symbolic link" in err


CASES = [
    # ------------------------------------------------ merge: never destroy what we did not write
    Case(
        "merge-into-a-folder-of-user-documents",
        "merge",
        lambda c: with_adapter(c, "--output", str(docs_folder(c))),
        2,
        "not a merged model written by hf-lora-recipe",
    ),
    Case(
        "merge-into-user-documents-even-with-overwrite",
        "merge",
        lambda c: with_adapter(c, "--output", str(docs_folder(c)), "--overwrite"),
        2,
        "merge never replaces files it did not write",
    ),
    Case(
        "merge-output-is-the-adapter-folder",
        "merge",
        lambda c: with_adapter(c, "--output", str(c.tmp / "adapter")),
        2,
        "is the adapter's folder",
    ),
    Case(
        "merge-output-is-the-adapter-folder-via-dots",
        "merge",
        lambda c: with_adapter(c, "--output", str(c.tmp / "adapter" / "checkpoint-2" / ".."), "--overwrite"),
        2,
        "is the adapter's folder",
    ),
    Case(
        "merge-output-inside-the-adapter-folder",
        "merge",
        lambda c: with_adapter(c, "--output", str(c.tmp / "adapter" / "merged")),
        2,
        "is inside the adapter's folder",
        nothing_new("adapter/merged"),
    ),
    Case(
        "merge-output-contains-the-adapter-folder",
        "merge",
        lambda c: ["--adapter", str(c.keep(c.adapter_copy("runs/adapter"))), "--output", str(c.tmp / "runs")],
        2,
        "contains the adapter's folder",
    ),
    Case(
        "merge-output-is-an-existing-file",
        "merge",
        lambda c: with_adapter(c, "--output", str(a_file(c, "model.bin")), "--overwrite"),
        2,
        "is an existing file",
    ),
    Case(
        "merge-output-under-an-existing-file",
        "merge",
        lambda c: with_adapter(c, "--output", str(a_file(c, "notes.txt") / "merged")),
        2,
        "notes.txt is a file, not a folder",
    ),
    Case("merge-output-is-a-symlink", "merge", link_to_documents, 2, "is a symbolic link"),
    Case("merge-output-with-tilde-is-expanded", "merge", tilde_output, 2, "home/docs is a folder that is not empty"),
    Case(
        "merge-over-our-merge-without-overwrite",
        "merge",
        lambda c: with_adapter(c, "--output", str(c.keep(c.previous_merge()))),
        2,
        "pass --overwrite to replace it",
    ),
    Case(
        "merge-over-our-merge-holding-a-user-file",
        "merge",
        our_merge_holding_a_user_file,
        2,
        "my-notes.md, which merge did not write",
    ),
    Case(
        "merge-over-a-pre-marker-merge-of-ours-without-overwrite",
        "merge",
        fake_merge_of_ours_without_marker,
        2,
        "pass --overwrite",
    ),
    Case(
        "merge-overwrite-replaces-our-merge-atomically",
        "merge",
        over_our_merge,
        0,
        "merged model written to",
        merged_as("bfloat16"),
    ),
    Case(
        "merge-into-an-empty-folder-never-copying-a-link",
        "merge",
        into_empty_folder_from_adapter_with_a_link,
        0,
        "merged model written to",
        merged_without_the_link,
    ),
    # ------------------------------------------------ merge: bad arguments, one line each
    Case(
        "merge-bad-dtype",
        "merge",
        lambda c: with_adapter(c, "--output", str(c.tmp / "m"), "--dtype", "float8"),
        2,
        "--dtype: invalid choice: 'float8'",
        nothing_new("m"),
    ),
    Case(
        "merge-folder-without-adapter-config",
        "merge",
        lambda c: ["--adapter", str(c.keep(docs_folder(c))), "--output", str(c.tmp / "m")],
        2,
        "no adapter_config.json there",
        nothing_new("m"),
    ),
    Case(
        "merge-adapter-that-is-not-there",
        "merge",
        lambda c: ["--adapter", "./no/such/adapter", "--output", str(c.tmp / "m")],
        2,
        "no such folder, and not a Hub repo id",
        nothing_new("m"),
    ),
    Case(
        "merge-adapter-config-not-json",
        "merge",
        lambda c: ["--adapter", str(adapter_with_config(c, "{ not json")), "--output", str(c.tmp / "m")],
        2,
        "adapter_config.json cannot be read as JSON",
        nothing_new("m"),
    ),
    Case(
        "merge-base-named-in-adapter-config-is-gone",
        "merge",
        missing_base,
        2,
        "deleted-base is not there; pass --base",
        nothing_new("merged"),
    ),
    # a base that is not the adapter's is refused from its config.json, before any weight loads
    Case(
        "merge-base-of-another-width",
        "merge",
        lambda c: other_base(c, hidden_size=96, head_dim=24),
        2,
        "down_proj has 96 output features, the adapter's 64: it is not the adapter's base",
        nothing_new("m"),
    ),
    Case(
        "merge-base-missing-adapted-layers",
        "merge",
        lambda c: other_base(c, num_hidden_layers=1),
        2,
        "has no linear layer model.layers.1.",
        nothing_new("m"),
    ),
    Case(
        "merge-base-with-a-smaller-vocabulary",
        "merge",
        lambda c: other_base(c, vocab_size=1000),
        2,
        "has 1000 token rows, fewer than the adapter's tokenizer's 32000",
        nothing_new("m"),
    ),
    # ------------------------------------------------ push: publish only what we mean to
    Case("push-symlinks-are-never-followed", "push", links_out, 0, "never follows links", link_warnings),
    Case(
        "push-stray-files-pickles-and-checkpoints-stay-home",
        "push",
        stray_files,
        0,
        "not published",
        stray_files_named,
    ),
    Case(
        "push-include-adds-a-file-and-the-upload-list-is-printed",
        "push",
        include_extra,
        0,
        "files (",
        upload_list_printed,
    ),
    Case(
        "push-additional-chat-templates-folder",
        "push",
        extra_chat_templates,
        0,
        "tool_use.jinja",
        chat_templates_published,
    ),
    # ------------------------------------------------ push: nothing local goes to the Hub
    Case(
        "push-local-base-without-an-id-names-no-base",
        "push",
        lambda c: ["--path", str(c.keep(c.adapter_copy())), "--repo_id", c.repo],
        0,
        "its Hub id is unknown: users must load the base themselves",
        published_base(None),
    ),
    Case(
        "push-base-model-id-names-the-base",
        "push",
        lambda c: ["--path", str(c.keep(c.adapter_copy())), "--repo_id", c.repo, "--base_model_id", "org/tiny-llama"],
        0,
        "uploading",
        published_base("org/tiny-llama"),
    ),
    Case(
        "push-base-id-from-the-recipe",
        "push",
        lambda c: ["--path", str(with_recipe_key(c, "base_model_id", "org/from-recipe")), "--repo_id", c.repo],
        0,
        "uploading",
        published_base("org/from-recipe"),
    ),
    Case(
        "push-base-id-from-the-base-config",
        "push",
        lambda c: ["--path", str(base_recording(c, "org/recorded-base")), "--repo_id", c.repo],
        0,
        "uploading",
        published_base("org/recorded-base"),
    ),
    Case(
        "push-adapter-without-recipe-names-no-local-base",
        "push",
        lambda c: ["--path", str(without_recipe(c)), "--repo_id", c.repo],
        2,
        "README.md would publish the local path ",  # the card cannot be re-rendered without recipe.yaml
        no_request,
    ),
    Case(
        "push-adapter-without-recipe-or-card-names-no-local-base",
        "push",
        lambda c: ["--path", str(without_recipe(c, card=False)), "--repo_id", c.repo],
        0,
        "its Hub id is unknown: users must load the base themselves",
        adapter_names_no_base,
    ),
    Case(
        "push-included-file-naming-a-local-path-is-refused",
        "push",
        local_path_in_extra,
        2,
        "notes.txt would publish the local path ",
        no_request,
    ),
    # ------------------------------------------------ push: bad input and a failing Hub, one line each
    Case(
        "push-path-missing",
        "push",
        lambda c: ["--path", str(c.tmp / "nope"), "--repo_id", c.repo],
        2,
        "nope: no such folder",
        no_request,
    ),
    Case(
        "push-path-is-a-file",
        "push",
        lambda c: ["--path", str(a_file(c, "model.safetensors")), "--repo_id", c.repo],
        2,
        "is a file, not a folder",
        no_request,
    ),
    Case(
        "push-folder-without-weights",
        "push",
        lambda c: ["--path", str(docs_folder(c)), "--repo_id", c.repo],
        2,
        "holds no .safetensors weights",
        no_request,
    ),
    Case(
        "push-invalid-repo-id-three-parts",
        "push",
        lambda c: pushable(c)[:3] + ["me/models/adapter"],
        2,
        "'me/models/adapter' is not a valid Hub repo id",
        no_request,
    ),
    Case(
        "push-invalid-repo-id-characters",
        "push",
        lambda c: pushable(c)[:3] + ["me/my adapter!"],
        2,
        "is not a valid Hub repo id",
        no_request,
    ),
    Case(
        "push-include-with-a-folder",
        "push",
        lambda c: pushable(c, "--include", "checkpoint-2/*"),
        2,
        "top-level file names only",
        no_request,
    ),
    Case("push-no-token", "push", pushable, 2, "no Hugging Face token", no_request, token=False),
    Case("push-wrong-token", "push", pushable, 2, "refused the token (HTTP 401", token_not_shown, token=WRONG_TOKEN),
    Case(
        "push-dead-endpoint",
        "push",
        lambda c: pushable(c, "--max_retries", "0"),
        2,
        "cannot reach the Hub at http://127.0.0.1:",
        hub="dead",
    ),
    Case("push-offline-mode", "push", pushable, 2, "HF_HUB_OFFLINE is set", no_request, hub="offline"),
    Case("push-hub-keeps-failing", "push", failing_commit, 2, "answered HTTP 500 to upload", nothing_committed),
    Case(
        "push-negative-retries",
        "push",
        lambda c: pushable(c, "--max_retries", "-1"),
        2,
        "--max_retries must be >= 0",
        no_request,
    ),
]


@pytest.fixture(scope="module")
def dead_endpoint():
    server = start_hub_server(TOKEN)
    server.close()  # its port now refuses connections
    return server


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory):
    return build_adapter_dir(tiny_base, tmp_path_factory.mktemp("hostile") / "adapter")


@pytest.fixture(scope="module")
def previous_merge(adapter, tmp_path_factory):
    """A real merged output of ours, written by the command itself."""
    output = tmp_path_factory.mktemp("previous") / "merged"
    assert merge_main(["--adapter", str(adapter), "--output", str(output), "--dtype", "float32"]) == 0
    return output


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_hostile_input(case, adapter, hub, dead_endpoint, tmp_path, request, monkeypatch, capsys):
    import huggingface_hub.constants as constants

    before = tree(adapter)
    ctx = Ctx(tmp_path, adapter, hub, request, monkeypatch, repo=f"user/{case.id}")
    argv = case.setup(ctx)
    capsys.readouterr()
    hub.clear_requests()
    if case.command == "merge":
        code = merge_main(argv)
    else:
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))  # no login but ours
        if case.hub == "offline":
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
            monkeypatch.setenv("HF_TOKEN", TOKEN)
            code = push_main(argv)
        else:
            server = hub if case.hub == "live" else dead_endpoint
            with server.patch_client(cache_dir=tmp_path / "client-cache", token=case.token):
                try:
                    code = push_main(argv)
                finally:
                    hub.clear_failures()
    out, err = capsys.readouterr()

    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert code == case.code, err
    if case.code:
        assert len(errors) == 1, err
        assert case.phrase in errors[0], errors[0]
    else:
        assert not errors, err
        assert case.phrase in out + err, out + err
    case.after(ctx, out, err)
    for path, snapshot in ctx.kept.items():
        assert tree(path) == snapshot, f"{path} changed"
    assert tree(adapter) == before, "the module's adapter changed"
