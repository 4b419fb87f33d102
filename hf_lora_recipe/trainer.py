"""TRL's SFTTrainer with the two things this recipe adds: a loss path per backend, and a record of what it read.

``lm_head_loss``: TRL computes the loss with its fused, tiled LM-head kernel, which never materialises the
(batch x length x vocab) logits - the right trade on a GPU, where the 128k-vocabulary logits of Llama 3 cost
~3 GB. On a CPU that kernel is most of the step (fp32 tiles forward and backward) and memory is not the
constraint, so ``auto`` uses the model's own cross-entropy there. Both normalise by the supervised tokens of
the whole accumulated, all-process batch (``num_items_in_batch``), so the choice changes speed, not numbers.
"""

from __future__ import annotations

import hashlib
from typing import Any

from transformers import Trainer
from trl import SFTTrainer


def uses_fused_loss(lm_head_loss: str) -> bool:
    import torch

    return lm_head_loss == "fused" or (lm_head_loss == "auto" and torch.cuda.is_available())


class RecipeTrainer(SFTTrainer):
    def __init__(self, *args: Any, fused_loss: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fused_loss = fused_loss
        self.examples_seen = 0
        self.positions = self.tokens = self.supervised = 0  # processed, non-padding, trained-on
        self._digest = hashlib.sha256()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fused_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Packed rows are kept apart by a mask derived from position_ids, which transformers only builds
        # when no KV cache exists: never let a model config with use_cache=True merge examples.
        return Trainer.compute_loss(self, model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch)

    def training_step(self, model, inputs, *args, **kwargs):
        input_ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        real = input_ids if mask is None else input_ids[mask.bool()]
        self._digest.update(real.detach().cpu().numpy().tobytes())
        self.positions += int(input_ids.numel())
        self.tokens += int(real.numel())
        self.supervised += int((inputs["labels"] != -100).sum())
        position_ids = inputs.get("position_ids")
        self.examples_seen += int((position_ids == 0).sum()) if mask is None and position_ids is not None else int(input_ids.shape[0])
        return super().training_step(model, inputs, *args, **kwargs)

    def data_line(self) -> str:
        padding = 1 - self.tokens / max(self.positions, 1)
        return (f"consumed {self.examples_seen} examples, data digest {self._digest.hexdigest()[:12]}; "
                f"{self.supervised:,} supervised of {self.positions:,} processed positions ({padding:.1%} padding)")
