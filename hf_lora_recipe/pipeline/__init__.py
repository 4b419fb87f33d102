"""The train pipeline: every stage below, in the order a run needs them."""
