"""Inference runtime: a static-KV-cache decode engine (CUDA graphs on GPUs), generation, synthetic
models for speed measurements, and the end-to-end benchmark. See docs/architecture.md ('Runtime')."""
