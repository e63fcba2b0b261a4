"""Build the trained demo pack (models/demo-lm): corpus, tokenizer, LM, SAEs, showcase."""
