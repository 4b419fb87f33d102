"""What a run leaves: the output folder, the model card, Hub upload, merging, loading for inference."""
