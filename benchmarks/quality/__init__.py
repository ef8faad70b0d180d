"""Quality benchmark: perplexity and passkey retrieval vs KV budget, per policy.

``python -m benchmarks.quality --help`` (from the repository root).
"""
