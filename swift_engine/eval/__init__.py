"""Streaming-quality evaluation: the perplexity harness (`ppl`). The corpus builder and the
training recipe of the bundled reference model live under benchmarks/ (corpus.py, train_reference.py)."""
