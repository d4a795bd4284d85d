"""Checkpoint importers and exporters (T5X, Hugging Face)."""
