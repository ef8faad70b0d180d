"""Throughput of vLLM + TOVA against stock vLLM, side by side in one run.

    python -m benchmarks.throughput [--preset cpu|gpu|tiny] [--mode offline|served|both]

See `benchmarks/throughput/__main__.py` for the options and the README section
"Throughput benchmark" for what is measured and how to read it.
"""
