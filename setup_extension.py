"""How setup.py builds the compiled extension ``sagan_fast._C``.

- torch without CUDA (or no nvcc): a C++ extension with the CPU implementations only.
- torch with CUDA and nvcc: also ``csrc/*.cu`` and the framework-free kernels ``kernels/*.cu``,
  for sm_80 and sm_90 by default, plus the PTX of the newest arch (``compute_90``), which the
  driver compiles for newer GPUs (forward compatibility).

Environment:
    SAGAN_FAST_CUDA_ARCHS   compute capabilities to build for, e.g. "9.0" or "8.0;9.0" or "80,90"
    SAGAN_FAST_FORCE_CPU=1  build the CPU-only extension even where CUDA is available
    SAGAN_FAST_NO_EXTENSION=1 (read by setup.py) skip the extension entirely
    MAX_JOBS                parallel compile jobs (torch's ninja build)
"""

from __future__ import annotations

import glob
import os
import re

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = ("8.0", "9.0")


def cuda_archs() -> list[str]:
    """["80", "90"] from SAGAN_FAST_CUDA_ARCHS ("8.0;9.0", "80,90", "9.0") or the default."""
    raw = os.environ.get("SAGAN_FAST_CUDA_ARCHS", "").strip()
    items = [a for a in re.split(r"[;,\s]+", raw) if a] if raw else list(DEFAULT_CUDA_ARCHS)
    archs = []
    for item in items:
        digits = item.replace(".", "")
        if not digits.isdigit():
            raise ValueError(f"SAGAN_FAST_CUDA_ARCHS: cannot read {item!r}; use e.g. '8.0;9.0'")
        if int(digits) < 80:
            raise ValueError(f"SAGAN_FAST_CUDA_ARCHS: sm_{digits} is not supported (bf16 tensor cores need sm_80+)")
        archs.append(digits)
    return archs


def nvcc_gencode_flags(archs: list[str]) -> list[str]:
    """-gencode flags: SASS for each arch in ``archs`` (["80", "90"]), and PTX for the newest."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    newest = max(archs, key=int)
    return flags + ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]


def _relative(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def use_cuda() -> bool:
    if os.environ.get("SAGAN_FAST_FORCE_CPU", "0") not in ("", "0"):
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension_modules():
    """(ext_modules, cmdclass) for setup()."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3"]  # the C++ standard: torch's BuildExtension picks the one its headers need
    sources = _relative(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernels")]
    if use_cuda():
        sources += _relative(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
        sources += _relative(glob.glob(os.path.join(ROOT, "kernels", "*.cu")))
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DSAGAN_FAST_WITH_CUDA",
                      *nvcc_gencode_flags(cuda_archs())]
        ext = CUDAExtension("sagan_fast._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags + ["-DSAGAN_FAST_WITH_CUDA"],
                                                "nvcc": nvcc_flags})
    else:
        ext = CppExtension("sagan_fast._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension}
