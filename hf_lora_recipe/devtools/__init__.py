"""Development assets apart from the library: the real SmolLM2 base, the tiny test model, the demo."""
