"""sagan_fast: a SAGAN (self-attention GAN with spectral norm) whose hot paths are fused kernels.

Import the layers you need from :mod:`sagan_fast.nn`, the functional ops from
:mod:`sagan_fast.ops`, the models from :mod:`sagan_fast.models`; ``sagan_fast.load_generator``
loads a trained generator (:mod:`sagan_fast.inference`), :mod:`sagan_fast.metrics` scores it.
"""

__version__ = "0.1.0"

_LAZY = {"load_generator": "sagan_fast.inference"}


def __getattr__(name: str):
    # Lazy, so `import sagan_fast` stays cheap (no torch import until a loader is used).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sagan_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
