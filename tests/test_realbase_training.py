"""A short run on the real pretrained base: a few QLoRA steps on SmolLM2 through its own ChatML template lower
the response loss on held-out rows (the run's own final evaluation, base vs adapter on the same masks)."""

from __future__ import annotations

import json

import pytest

from hf_lora_recipe.devtools.demo import make_dataset
from hf_lora_recipe.recipe.schema import Recipe


# ~55 s of 135M-parameter training on 2 cores: with the slow tests, which CI runs after make test, so the
# default suite stays near 3 minutes (make demo runs the same path on more rows)
@pytest.mark.slow
def test_a_few_steps_on_smollm2_lower_the_held_out_response_loss(smollm2_base, tmp_path):
    import torch

    from hf_lora_recipe.pipeline.train_run import run

    train_rows, held_out = make_dataset(num_train=8, num_eval=4, seed=0)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text(json.dumps(train_rows))
    (data / "test.json").write_text(json.dumps(held_out))
    recipe = Recipe(
        model_name_or_path=str(smollm2_base),
        chat_template="native",
        dataset_name=str(data),
        dataset_test_split="test",
        max_length=64,
        global_batch_size=2,
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=5e-4,
        logging_steps=1,
        save_steps=100,
        eval_steps=100,
        final_eval_examples=4,
        # NF4 as the seed, fp32 compute: this CPU has no fast bf16 matmul (recipes/smollm2-demo.yaml)
        bnb_4bit_compute_dtype="float32",
        bf16=False,
        gradient_checkpointing=False,
        output_dir=str(tmp_path / "run"),
    )
    threads = torch.get_num_threads()
    try:
        output_dir = run(recipe)
    finally:
        torch.set_num_threads(threads)
    results = json.loads((output_dir / "training_results.json").read_text())
    models = results["evaluation"]["models"]
    assert results["evaluation"]["num_examples"] == 4
    base, adapter = models["base"]["response_loss"], models["adapter"]["response_loss"]
    assert adapter < 0.8 * base, (base, adapter)
    assert models["adapter"]["stop_rate"] >= models["base"]["stop_rate"]
    assert "## Evaluation" in (output_dir / "README.md").read_text()
