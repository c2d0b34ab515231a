"""Streaming-quality evaluation: perplexity harness (`ppl`), corpus builder (`corpus`) and the
training recipe of the small reference model (`train`, a self-contained script)."""
