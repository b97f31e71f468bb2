"""sagan_fast: a SAGAN (self-attention GAN with spectral norm) whose hot paths are fused kernels.

Import the layers you need from :mod:`sagan_fast.nn`, the functional ops from
:mod:`sagan_fast.ops`, the models from :mod:`sagan_fast.models`.
"""

__version__ = "0.1.0"
