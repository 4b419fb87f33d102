"""Orthogonal init: A and B from orthogonal halves of one random rotation, so both train from the first step while
B A = 0 keeps step 0 at the base."""

from __future__ import annotations

from typing import Any, ClassVar

from hf_lora_recipe.inits.base import LoraInit
from hf_lora_recipe.recipe.schema import Recipe, RecipeError


# |B A| against |B| |A|, largest entry: fp32 factors leave ~1e-7. PEFT rounds A and B to the base's dtype before they
# become fp32 again, so on a bf16 base B A is only zero to bf16 rounding: the tolerance is then that dtype's epsilon;
# an initialisation with B A != 0 is off by O(1).
ORTHOGONAL_TOLERANCE = 1e-5


class Orthogonal(LoraInit):
    names: ClassVar[tuple[str, ...]] = ("orthogonal",)
    summary = "A and B from orthogonal halves of one random rotation, B A = 0 (even r, load_in_4bit false)"

    def validate(self, recipe: Recipe) -> None:
        if recipe.load_in_4bit or recipe.lora_r % 2:
            raise RecipeError(
                f"init_lora_weights: orthogonal needs an even lora_r (got {recipe.lora_r}) and load_in_4bit "
                "false (PEFT casts A and B to the base weight's dtype, which a 4-bit base stores as bytes)"
            )

    def verify(self, model: Any, recipe: Recipe, layers: list[tuple[str, Any]], before: Any) -> None:
        for name, layer in layers:
            for adapter in layer.lora_A:
                check_product_is_zero(
                    name,
                    layer.lora_A[adapter].weight,
                    layer.lora_B[adapter].weight,
                    layer.get_base_layer().weight.dtype,
                )


def check_product_is_zero(name: str, lora_a: Any, lora_b: Any, base_dtype: Any) -> None:
    """B and A are both non-zero (that is the point) yet B A = 0, so step 0 is the base (to the base dtype's
    rounding)."""
    import torch

    tolerance = ORTHOGONAL_TOLERANCE if base_dtype == torch.float32 else torch.finfo(base_dtype).eps
    with torch.no_grad():
        a, b = lora_a.float(), lora_b.float()
        product = (b @ a).abs().max().item()
        scale = (b.abs() @ a.abs()).max().item()
    if b.abs().max() == 0 or product > tolerance * scale:
        raise RuntimeError(
            f"{name}: init_lora_weights orthogonal should give non-zero A and B with B A = 0; got "
            f"|B| max {b.abs().max().item():.2g}, |B A| {product:.2g} of {scale:.2g}: it would not "
            "start at the base, or PEFT did not apply it"
        )
