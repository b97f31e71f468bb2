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
    # The digits judge's weights (sagan_fast.metrics) ship with the package.
    package_data={"sagan_fast": ["py.typed", "metrics/digits_classifier.pt"]},
    python_requires=">=3.10",
    # A range, not a pin: the torch already installed (CPU 2.13 here, CUDA 2.11 on GPU boxes)
    # satisfies it, so pip never swaps it for a multi-GB download. torchmetrics computes FID/KID/IS;
    # matplotlib draws a run's metrics.png.
    install_requires=["torch>=2.5", "numpy", "tqdm", "tensorboard", "pillow", "scikit-learn",
                      "torchmetrics>=1.0", "matplotlib"],
    extras_require={
        "test": ["pytest>=8"],
        "bench": ["matplotlib", "nvidia-ml-py"],
        # Inception FID/KID/IS (with a local weights file). torch-fidelity needs torchvision: install
        # the one built for your torch first, or pip may replace torch to satisfy a newer one.
        "inception": ["torch-fidelity"],
    },
    entry_points={
        "console_scripts": [
            "sagan-fast-train=sagan_fast.train_ddp:main",
            "sagan-fast-sample=sagan_fast.sample:main",
            "sagan-fast-evaluate=sagan_fast.evaluate:main",
        ],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
