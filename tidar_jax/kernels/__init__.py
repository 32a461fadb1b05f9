"""Pallas kernels, each beside the pure-jnp reference its tests compare it with."""
