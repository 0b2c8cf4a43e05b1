"""Data for the embedded default: proxy tasks, the training corpus and the tokenizer."""
