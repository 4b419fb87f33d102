"""The base (NF4 or not) and its adapter: loading, quantization, LoRA targets, attention, per-layer compile."""
