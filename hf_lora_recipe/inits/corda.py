"""CorDA (``init_lora_weights: corda``), PEFT's context-oriented decomposition in its instruction-previewed mode
(IPM): each target weight is decomposed against the covariance of its inputs on the training data, and the
components the task uses most become the adapter (A, B), the base keeping the rest (W_res = W - s B0 A0).

Before the adapter exists, the base runs (eval mode, no gradients, one example at a time as PEFT's hooks expect) over
the first :data:`CORDA_EXAMPLES` tokenized training examples while ``peft.preprocess_corda`` accumulates every
target layer's input covariance; ``get_peft_model`` then sets A and B from it. Like PiSSA/OLoRA it rewrites the base,
so it shares their proof, their saved step-0 adapter and their conversion to a plain adapter of the original base
(:class:`hf_lora_recipe.inits.pissa_olora.BaseRewriting`). A resumed run repeats the pass on the same examples and
is checked to rebuild the same initialisation. PEFT's covariance and eigen caches (``torch.save`` pickles) are not
used: nothing we write is a pickle.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

from hf_lora_recipe import log
from hf_lora_recipe.inits.pissa_olora import BaseRecord, BaseRewriting
from hf_lora_recipe.recipe.schema import Recipe, RecipeError


# PEFT's guide: about hidden size / tokens per example x 128 examples; 256 covers an 8B model's 4096-wide layers at
# 2048 tokens per example, and more than covers the shorter instruction rows of Alpaca-like data.
CORDA_EXAMPLES = 256


class CorDA(BaseRewriting):
    names: ClassVar[tuple[str, ...]] = ("corda",)
    summary = (
        "A and B from the base weights decomposed against the covariance of their inputs on the training data "
        "(PEFT's CorDA, instruction-previewed); the base keeps the rest"
    )
    title = "CorDA"

    def validate(self, recipe: Recipe) -> None:
        super().validate(recipe)
        if recipe.streaming:
            raise RecipeError(
                "init_lora_weights: corda with streaming: true is not supported: its covariance pass would read the "
                "stream's first examples an extra time before training; set streaming false, or use "
                "init_lora_weights true"
            )

    def peft_kwargs(self, recipe: Recipe) -> dict[str, Any]:
        from peft.tuners.lora.config import CordaConfig

        return {"init_lora_weights": "corda", "corda_config": CordaConfig(corda_method="ipm")}

    def before_adapter(self, model: Any, recipe: Recipe, config: Any, data: Any) -> BaseRecord:
        from peft.tuners.lora.corda import preprocess_corda

        if data is None:
            raise RuntimeError("init_lora_weights corda needs the tokenized training data (add_adapter's data)")
        record = super().before_adapter(model, recipe, config, data)  # before anything is rewritten
        examples = CovariancePass(model, data)
        preprocess_corda(model, config, run_model=examples)
        log.info(f"CorDA: every target layer's input covariance from {examples.read} training examples")
        return record


class CovariancePass:
    """PEFT's ``run_model``: the base on at most :data:`CORDA_EXAMPLES` training examples, one at a time (PEFT's
    hooks drop the batch dimension), in eval mode without gradients; the model's mode is restored after."""

    def __init__(self, model: Any, data: Any):
        self.model, self.data, self.read = model, data, 0

    def __call__(self) -> None:
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for example in itertools.islice(iter(self.data), CORDA_EXAMPLES):
                    input_ids = torch.tensor([example["input_ids"]], device=self.model.device)
                    self.model(input_ids=input_ids, use_cache=False)
                    self.read += 1
        finally:
            self.model.train(was_training)
        if not self.read:
            raise RecipeError("init_lora_weights: corda: the training set has no example to take covariances from")
