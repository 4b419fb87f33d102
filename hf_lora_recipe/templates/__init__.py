"""Conversations to token ids and labels: the seed's [INST] layout, any Jinja chat template, the tokenizer, and the untrained-template-token guard."""
