"""Serving with the tuned configs: ``preflight`` (a vllm serve command checked before it starts) and
``validate-serve`` (the recipe's serve, the proof that vLLM loaded the files, the benchmark, A/B pairs, the reduced
one-GPU model)."""
