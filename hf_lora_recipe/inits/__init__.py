"""LoRA initialisations beyond PEFT's default: EVA, PiSSA/OLoRA."""
