"""Install sagan_fast (pure Python always works; the compiled extension is optional).

    pip install -e . --no-build-isolation          # uses the torch you already have
    SAGAN_FAST_NO_EXTENSION=1 pip install -e .     # pure Python only
"""

import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("SAGAN_FAST_NO_EXTENSION", "0") in ("", "0"):
    try:
        from setup_extension import extension_modules  # noqa: E402  (filled by the CUDA build)
        ext_modules, cmdclass = extension_modules()
    except ImportError:
        pass

setup(
    name="sagan_fast",
    version="0.1.0",
    description="SAGAN with fused spectral-norm and self-attention kernels (Triton and CUDA C++)",
    packages=find_packages(include=["sagan_fast", "sagan_fast.*"]),
    package_data={"sagan_fast": ["py.typed"]},
    python_requires=">=3.10",
    # A range, not a pin: the torch already installed (CPU 2.13 here, CUDA 2.11 on GPU boxes)
    # satisfies it, so pip never swaps it for a multi-GB download.
    install_requires=["torch>=2.5", "numpy", "tqdm", "tensorboard", "pillow", "scikit-learn"],
    extras_require={
        "test": ["pytest>=8"],
        "bench": ["matplotlib", "nvidia-ml-py"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
