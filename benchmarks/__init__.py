"""Benchmark harness: a serialized in-process TransformerLens + SAE Lens baseline against the served app over HTTP.

    python -m benchmarks.run --shape gpt2-small            # full run; table on stdout, JSON in benchmarks/results/
    python -m benchmarks.report                            # README performance section from the JSON
"""
