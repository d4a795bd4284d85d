"""Mixture-of-Experts feed-forward layers: routers (routing.py) and the sparse layer (layer.py)."""
