"""Transformer models (T5.1.1 encoder-decoder, decoder-only LM) and the Model wrapper."""
