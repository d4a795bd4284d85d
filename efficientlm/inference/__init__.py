"""Inference: decoding with a KV cache, int8 weights, partitioned layouts, performance model."""
