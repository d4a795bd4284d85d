"""Transformer building blocks, each parameter annotated with logical axis names."""
