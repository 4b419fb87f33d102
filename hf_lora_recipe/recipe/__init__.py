"""The recipe: its schema (the seed defaults), loading and validation, and the command-line parser built from it."""
