"""PEFT's own initialisations: Kaiming-uniform A (``true``, the default) or Gaussian A (``gaussian``), B = 0."""

from __future__ import annotations

from typing import ClassVar

from hf_lora_recipe.inits.base import LoraInit


class PeftDefault(LoraInit):
    names: ClassVar[tuple[str, ...]] = ("true", "gaussian")
    summary = "true = Kaiming-uniform A, B = 0 (PEFT's default); gaussian = A ~ N(0, 1/r), B = 0"
