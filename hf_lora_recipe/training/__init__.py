"""TRL's SFTTrainer from the recipe, auto micro-batch, checkpoints, resume and signals."""
