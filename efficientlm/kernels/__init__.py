"""Pallas kernels, each with a pure-jnp reference (reference.py) that tests compare against."""
