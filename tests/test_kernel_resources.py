"""What ptxas says about our kernels on Hopper (sm_90), checked on every CPU run (no GPU needed).

``bench/kernel_resources.py --ci`` compiles every Triton variant CI covers (every tuner candidate
at DESIGN.md's anchor shape in bf16 / fp16 / fp32, the defaults elsewhere, the spectral-norm
kernels) exactly as the JIT specializes a launch at the production shapes and strides, and the
CUDA kernels with nvcc. Rules: no register spills; warp-group MMA (wgmma) in every 16-bit
attention kernel that has a product; shared memory within Hopper's 227 KB per block; PTX embedded
in the CUDA build; 16-byte loads in the spectral-norm kernels, and no integer division in their
multi-tensor kernels (SAGAN's weights are all dim 0).

The report runs in a subprocess (the tests import the kernels under TRITON_INTERPRET=1, which
replaces them by interpreted functions). Its compile cache (build/kernel_resources/) makes a run
after `.ci/run`'s report step take seconds; cold, about 4 minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOPPER_SMEM_BYTES = 227 * 1024


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("kernel_resources") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(REPO / "bench" / "kernel_resources.py"), "--ci", "--json", str(path)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"kernel_resources.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(path.read_text())


def _triton(report):
    return [r for r in report["rows"] if r.get("path") != "cuda"]


def _cuda(report):
    return [r for r in report["rows"] if r.get("path") == "cuda"]


def _name(r) -> str:
    return f"{r['kernel']} [{r['candidate']}] {r['shape']} {r['dtype']} {r['layout']}"


def test_every_triton_variant_compiles_for_sm90_without_spills(report):
    rows = _triton(report)
    assert not [r for r in rows if "error" in r], [(_name(r), r["error"]) for r in rows if "error" in r]
    spilled = [(_name(r), r["spill_bytes"]) for r in rows if r["spill_bytes"]]
    assert not spilled, f"register spills (ptxas -v): {spilled}"


def test_report_covers_every_candidate_with_the_launch_specialization(report):
    """The tuner's candidates all appear, and the JIT's specialization was applied: the unit
    stride of q is a constexpr (channel-major: the token stride; channels_last: the feature one)."""
    rows = [r for r in _triton(report) if r["shape"].startswith("G32x32") and r["dtype"] == "bf16"]
    fwd = [r for r in rows if r["kernel"] == "_attn_fwd_kernel" and r["layout"] == "channel-major"]
    assert len(fwd) == 6 and fwd[0]["candidate"].startswith("default fwd M128 N64")
    kernels = {r["kernel"] for r in rows}
    assert kernels >= {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel +atomic dq",
                       "_attn_bwd_dkdv_kernel", "_attn_bwd_dv_kernel", "_attn_bwd_dk_kernel +atomic dq",
                       "_attn_bwd_dk_kernel", "_attn_bwd_dq_kernel"}
    for layout, unit in (("channel-major", "stride_qn"), ("channels_last", "stride_qe")):
        r = next(r for r in rows if r["kernel"] == "_attn_fwd_kernel" and r["layout"] == layout)
        assert unit in r["constexpr_args"] and r["aligned_args"] >= 10, (layout, r["constexpr_args"])


def test_16bit_attention_kernels_use_warp_group_mma(report):
    rows = [r for r in _triton(report) if r["dtype"] in ("bf16", "fp16") and r["kernel"].startswith("_attn")
            and "delta" not in r["kernel"]]   # delta: a row sum, no product
    assert rows
    without = [_name(r) for r in rows if r["wgmma"] == 0]
    assert not without, f"no wgmma.mma_async in the PTX of: {without}"


def test_shared_memory_fits_hopper(report):
    over = [(_name(r), r["shared_bytes"]) for r in report["rows"]
            if (r.get("shared_bytes") or 0) > HOPPER_SMEM_BYTES]
    assert not over, over


def test_spectral_norm_kernels_issue_16_byte_loads(report):
    """Every SN kernel variant SAGAN-128 launches (fp32, and fp32 master weights with a bf16 W_sn)
    reads W, G and its workspaces with 16-byte vectors: the multi-tensor kernels in the branch
    their plan's alignment flags select (tl.multiple_of on table pointers), the per-layer ones
    from the JIT's specialization."""
    rows = [r for r in _triton(report) if not r["kernel"].startswith("_attn")]
    assert {r["dtype"] for r in rows} == {"fp32", "fp32 W, bf16 W_sn (autocast)"}
    assert {r["kernel"] for r in rows} >= {"_matvec_kernel", "_rmatvec_kernel", "_finalize_kernel",
                                           "_uwv_partials_multi_kernel", "_scale_multi_kernel",
                                           "_dot_partials_multi_kernel", "_normalize_backward_multi_kernel"}
    narrow = [(r["kernel"], r["dtype"], r["max_load_bytes"]) for r in rows if r["max_load_bytes"] < 16]
    assert not narrow, f"widest global load under 16 bytes: {narrow}"


def test_spectral_norm_multi_tensor_kernels_have_no_integer_division(report):
    """All SAGAN weights use dim 0: the multi-tensor kernels of their group are compiled without
    the general-dim path, so the PTX has no div / rem at all."""
    rows = [r for r in _triton(report) if r["kernel"].endswith("_multi_kernel") or r["kernel"] in
            ("_matvec_kernel", "_rmatvec_kernel", "_finalize_kernel")]
    assert rows
    divs = [(r["kernel"], r["dtype"], r["int_div"]) for r in rows if r["int_div"]]
    assert not divs, f"integer division in the PTX: {divs}"


def test_cuda_kernels_no_spills_and_ptx_embedded(report):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found: the CUDA kernels are not compiled here")
    rows = _cuda(report)
    names = {r["kernel"] for r in rows}
    assert {"attention_forward_kernel", "attention_dq_dk_kernel", "attention_dv_kernel",
            "sn_backward_apply_rows_kernel"} <= names
    spilled = [(r["kernel"], r["dtype"], r["spill_bytes"]) for r in rows if r["spill_bytes"]]
    assert not spilled, f"register spills (nvcc -Xptxas -v): {spilled}"
    assert all(r["ptx_embedded"] for r in rows), "no compute_90 PTX in the objects (forward compatibility)"
    # fp16 / bf16 attention runs on tensor cores, and its tiles are loaded by cp.async.
    tc = [r for r in rows if r["kernel"].startswith("attention_") and "delta" not in r["kernel"]
          and ("half" in r["dtype"] or "bfloat16" in r["dtype"])]
    assert tc and all(r["mma"] > 0 and r["cp_async"] > 0 for r in tc)


def test_setup_extension_embeds_ptx_of_the_newest_arch():
    sys.path.insert(0, str(REPO))
    import setup_extension
    assert setup_extension.nvcc_gencode_flags(["80", "90"]) == [
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "-gencode", "arch=compute_90,code=compute_90"]
