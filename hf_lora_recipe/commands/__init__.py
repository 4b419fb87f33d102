"""One thin module per `hf-lora-recipe` command: parse, call the library, print. Nothing imports these."""
