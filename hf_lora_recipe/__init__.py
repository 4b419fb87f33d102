"""hf-lora-recipe: the LoRA / QLoRA instruction-tuning recipe on transformers, peft, trl and accelerate."""

__version__ = "0.1.0"
