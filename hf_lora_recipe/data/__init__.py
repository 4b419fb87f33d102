"""Rows to training examples: readers, row formats, OpenAssistant trees, mixtures, streaming, the label audit."""
