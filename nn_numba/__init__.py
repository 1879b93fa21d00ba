"""nn-numba: a 784-250-250-10 MNIST trainer written as explicit Numba loops.

The Python API (nn_numba/api.py, docs/api.md): load, fit, read_metrics, config_names, Network,
Prediction. They are imported on first use, so `import nn_numba` loads neither NumPy nor Numba.
"""

__version__ = "0.1.0"
__all__ = ["Network", "Prediction", "load", "fit", "read_metrics", "config_names"]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'nn_numba' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
