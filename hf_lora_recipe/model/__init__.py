"""The base (NF4 or not): loading, quantization, its config on the meta device, LoRA targets, attention, per-layer compile."""
