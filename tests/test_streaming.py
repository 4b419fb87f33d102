"""``streaming: true``: the same examples as the map-style path, audited as they stream, and a resume that
continues at exactly the next example (the data digest, carried across the resume, proves it)."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from hf_lora_recipe.data.pipeline import build_sft_dataset
from hf_lora_recipe.data.streaming import HEAD_ROWS, build_stream
from hf_lora_recipe.recipe.schema import RecipeError, load_recipe_dict
from hf_lora_recipe.templates.tokenizer import load_tokenizer

from .conftest import CLI, REPO_ROOT, run_cli, shared_asset


@pytest.fixture(scope="module")
def rows():
    return json.loads(shared_asset("data/alpaca_en_demo.json").read_text())[:300]


def _write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 3 else "") for i, r in enumerate(rows)))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _recipe(path, **keys):
    return load_recipe_dict(
        {
            "model_name_or_path": str(shared_asset("tokenizers/llama2")),
            "dataset_name": str(path),
            "max_length": 128,
            "max_steps": 10,
            "train_sampling_strategy": "sequential",
            **keys,
        }
    )


def _take(stream, count):
    iterator = iter(stream)
    return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_the_stream_holds_the_prepared_examples_in_order_then_repeats(tmp_path, rows, suffix, llama2_tokenizer):
    path = _write(tmp_path / f"data{suffix}", rows)
    prepared, report = build_sft_dataset(_recipe(path), llama2_tokenizer)
    stream, head = build_stream(_recipe(path, streaming=True), llama2_tokenizer)
    streamed = _take(stream, len(prepared) + 7)
    for index, example in enumerate(streamed):
        reference = prepared[index % len(prepared)]  # after the last example the stream starts again, same order
        assert (example["input_ids"], example["labels"]) == (reference["input_ids"], reference["labels"]), index
    assert head.examples_in == HEAD_ROWS and head.summary().startswith(
        f"data (streaming: the first {HEAD_ROWS} rows, checked before loading; the rest are checked as they stream)"
    )
    assert head.streamed.rows >= len(rows) and head.streamed.kept >= len(prepared)


def test_random_order_is_a_seeded_shuffle(tmp_path, rows, llama2_tokenizer):
    path = _write(tmp_path / "data.jsonl", rows)
    prepared, _ = build_sft_dataset(_recipe(path), llama2_tokenizer)
    first = _take(
        build_stream(_recipe(path, streaming=True, train_sampling_strategy="random"), llama2_tokenizer)[0],
        len(prepared),
    )
    again = _take(
        build_stream(_recipe(path, streaming=True, train_sampling_strategy="random"), llama2_tokenizer)[0],
        len(prepared),
    )
    other = _take(
        build_stream(_recipe(path, streaming=True, train_sampling_strategy="random", seed=1), llama2_tokenizer)[0],
        len(prepared),
    )
    ids = lambda examples: [e["input_ids"] for e in examples]  # noqa: E731
    assert ids(first) == ids(again) != ids(other)
    assert ids(first) != prepared["input_ids"] and sorted(ids(first)) == sorted(prepared["input_ids"])


def test_a_bad_row_in_the_first_rows_stops_before_loading(tmp_path, rows, llama2_tokenizer):
    path = _write(tmp_path / "data.jsonl", [*rows[:4], {"instruction": "x", "output": None}, *rows[4:]])
    with pytest.raises(
        RecipeError,
        match=r"^data.jsonl line 6: field 'output' is missing or null \(fix the row or "
        r"set on_bad_rows: skip",
    ):
        build_stream(_recipe(path, streaming=True), llama2_tokenizer)  # line 6: one blank line before it
    _, head = build_stream(_recipe(path, streaming=True, on_bad_rows="skip"), llama2_tokenizer)
    assert head.dropped == {"field 'output' is missing or null": 1}


def test_a_bad_row_later_in_the_stream_stops_it_naming_the_line(tmp_path, rows, llama2_tokenizer):
    path = _write(tmp_path / "data.jsonl", [*rows, {"instruction": "x", "output": ""}])
    stream, _ = build_stream(_recipe(path, streaming=True), llama2_tokenizer)  # the first rows are fine
    with pytest.raises(RecipeError, match=r"^data.jsonl line 302: field 'output' is empty"):
        _take(stream, 400)
    broken = tmp_path / "broken.jsonl"
    broken.write_text((tmp_path / "data.jsonl").read_text().replace('"output": ""}', '"output": "'))
    stream, _ = build_stream(_recipe(broken, streaming=True), llama2_tokenizer)
    with pytest.raises(RecipeError, match=r"^broken.jsonl line 302 column \d+: not valid JSON"):
        _take(stream, 400)


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"max_steps": -1}, "streaming: true needs max_steps > 0"),
        ({"eval_split_size": 0.1}, "streaming: eval_split_size needs the whole training set"),
        ({"dataset_format": "oasst"}, "streaming: OpenAssistant trees must be read whole"),
        ({"train_sampling_strategy": "group_by_length"}, "streaming: group_by_length sorts the whole set"),
    ],
)
def test_what_a_stream_cannot_do_is_refused(keys, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe_dict({"dataset_name": "data.jsonl", "streaming": True, "max_steps": 10, **keys})


def test_plan_counts_a_stream_by_max_steps_at_its_first_rows_mean_length(tmp_path, rows, tiny_base):
    from hf_lora_recipe.planning.plan import token_counts

    path = _write(tmp_path / "data.jsonl", rows)
    recipe = load_recipe_dict(
        {
            "model_name_or_path": str(tiny_base),
            "dataset_name": str(path),
            "streaming": True,
            "max_steps": 100,
            "max_length": 128,
        }
    )
    counts = token_counts(recipe)
    assert counts["examples"] == 100 * 128 and counts["source"].startswith("streaming: max_steps x global batch")
    _, head = build_stream(recipe, load_tokenizer(str(tiny_base)))
    assert counts["tokens"] == int(head.mean_length * 100 * 128)


def _train_args(tiny_base, data, output_dir, *extra):
    return [
        CLI,
        "train",
        "--model_name_or_path",
        str(tiny_base),
        "--dataset_name",
        str(data),
        "--max_length",
        "64",
        "--lora_dropout",
        "0",
        "--load_in_4bit",
        "false",
        "--bf16",
        "false",
        "--learning_rate",
        "1e-3",
        "--global_batch_size",
        "8",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--train_sampling_strategy",
        "sequential",
        "--output_dir",
        str(output_dir),
        *extra,
    ]


def _digest(stdout: str) -> tuple[str, str]:
    return re.search(r"consumed (\d+) examples, data digest (\w+)", stdout).groups()


@pytest.mark.slow
def test_streaming_trains_exactly_what_the_map_style_path_trains(tiny_base, tmp_path, rows):
    data = _write(tmp_path / "data.jsonl", rows)
    runs = {}
    for streaming in ("false", "true"):
        done = run_cli(
            *_train_args(tiny_base, data, tmp_path / streaming, "--max_steps", "3", "--streaming", streaming)
        )
        assert done.returncode == 0, done.stderr[-3000:]
        losses = [float(x) for x in re.findall(r"'loss': '([0-9.]+)'", done.stdout)]
        runs[streaming] = (_digest(done.stdout), losses, load_file(tmp_path / streaming / "adapter_model.safetensors"))
    assert runs["true"][0] == runs["false"][0] and runs["true"][0][0] == "24"  # same tokens, same order
    assert runs["true"][1] == runs["false"][1] and len(runs["true"][1]) == 3  # padding-free packing, same losses
    for name, tensor in runs["false"][2].items():
        torch.testing.assert_close(runs["true"][2][name], tensor, rtol=0, atol=1e-6)
    results = json.loads((tmp_path / "true" / "training_results.json").read_text())
    assert results["training_examples"] == 24 and results["tokens_per_epoch"] is None
    assert results["stream"]["examples_kept"] >= 24


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_stream_at_the_next_example(tiny_base, tmp_path, rows):
    data = _write(tmp_path / "data.jsonl", rows)
    steps = ["--max_steps", "8", "--save_steps", "2", "--streaming", "true", "--train_sampling_strategy", "random"]
    reference = run_cli(*_train_args(tiny_base, data, tmp_path / "reference", *steps))
    assert reference.returncode == 0, reference.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    command = _train_args(tiny_base, data, interrupted, *steps)
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from .test_resilience import _wait_for

    _wait_for(lambda: (interrupted / "checkpoint-4" / "hf_lora_recipe.json").is_file(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (interrupted / "checkpoint-4" / "data_counts_rank0.json").is_file()
    resumed = run_cli(*command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "streaming: the trainer re-reads the stream from its start and skips" in resumed.stdout
    # the digest of every token trained, in order, across the kill: nothing repeated, nothing skipped
    assert _digest(resumed.stdout) == _digest(reference.stdout) and _digest(reference.stdout)[0] == "64"
    ours, theirs = (load_file(d / "adapter_model.safetensors") for d in (interrupted, tmp_path / "reference"))
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-6


@pytest.mark.slow
def test_two_processes_stream_what_one_process_streams(tiny_base, tmp_path, rows):
    from .conftest import ACCELERATE
    from .test_resilience import CPU_DDP, DDP_TOLERANCE, _free_port

    data = _write(tmp_path / "data.jsonl", rows)
    one = run_cli(*_train_args(tiny_base, data, tmp_path / "one", "--max_steps", "3", "--streaming", "true"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(
        ACCELERATE,
        "launch",
        "--config_file",
        CPU_DDP,
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "hf_lora_recipe.train",
        *_train_args(tiny_base, data, tmp_path / "two", "--max_steps", "3", "--streaming", "true")[2:],
    )
    assert two.returncode == 0, two.stderr[-3000:]
    ranks = dict(re.findall(r"rank (\d)/2\] consumed (\d+) examples", two.stdout))
    assert ranks == {"0": "12", "1": "12"}  # rank 0 reads the stream, each rank trains its half of every batch
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "two"))
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < DDP_TOLERANCE


def test_a_stream_whose_last_line_is_being_written_is_read_to_its_last_complete_line(
    tmp_path, rows, llama2_tokenizer, capsys
):
    """A file still being appended: its last line has no newline and is not JSON yet. The stream stops before
    it (and says so) rather than fail; a last line without newline that is complete JSON is read."""
    path = _write(tmp_path / "growing.jsonl", rows[:5])
    with path.open("a") as handle:
        handle.write('{"instruction": "half writ')
    stream, head = build_stream(_recipe(path, streaming=True), llama2_tokenizer)
    assert head.examples_in == 5
    assert (
        "growing.jsonl line 7 is not complete yet (no newline, not valid JSON): read up to line 6"
        in capsys.readouterr().err
    )
    complete = tmp_path / "no-final-newline.jsonl"
    complete.write_text(path.read_text().rsplit("\n", 1)[0] + "\n" + json.dumps(rows[5]))
    _, head = build_stream(_recipe(complete, streaming=True), llama2_tokenizer)
    assert head.examples_in == 6
