"""nn-numba: a 784-250-250-10 MNIST trainer written as explicit Numba loops."""

__version__ = "0.1.0"
