"""Base vs adapter (vs merged) on held-out data."""
