"""SAGAN attention: the Triton kernels against the float64 reference, forward and every gradient.

On a CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1): fp32 and
fp16 only, small odd shapes. The interpreter's tiles are 32 wide (see ``_tiles``), so the shapes
below cover: N and Nk not multiples of the block, several key blocks, Ev split over several value
slices (40 = 32 + 8, 72 = 32 + 32 + 8) and Ev in one slice, E not a power of two, batch 1.
`gpu` tests run the DESIGN.md shapes on a real card against PyTorch's own error.
"""

from __future__ import annotations


import pytest
import torch

from sagan_fast.nn import SelfAttention2d
from sagan_fast.ops import BackendUnavailableError, reference
from sagan_fast.ops import attention as attention_ops
from sagan_fast.ops.triton import attention as tri
from tests.utils import assert_close_report, assert_within_factor_of_torch, requires_cuda

# (B, N, Nk, E, Ev) with readable ids.
SHAPES = {
    "map7x9-pooled-E24-Ev40": (1, 63, 12, 24, 40),
    "N63-Nk37-E8-Ev24-B2": (2, 63, 37, 8, 24),
    "N33-Nk65-E17-Ev72": (1, 33, 65, 17, 72),
}

# Direct tolerances vs float64 on the same (rounded) inputs, |q|, |k|, |v| ~ N(0, 1), so scores
# reach ~ +-15 and outputs / grads are O(1..10):
# - fp32: every dot accumulates in fp32 (eps 6e-8) over <= 72 terms, and exp2 of a score that
#   carries a few ulps of |score| <= 20; measured <= 6e-6 on these shapes; bounds leave ~10x.
#   A masking or scaling bug gives O(0.1..1) errors, far above.
# - fp16: p and ds are rounded to fp16 (eps 4.9e-4) before their dots, as PyTorch's naive fp16
#   path rounds its whole score matrix; measured <= 6e-3 on grads of size ~10; bounds leave ~4x.
TOLERANCES = {
    torch.float32: dict(out=(2e-5, 2e-5), grad=(1e-4, 1e-4)),
    torch.float16: dict(out=(5e-3, 5e-3), grad=(3e-2, 1e-2)),
}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _make(B, N, Nk, E, Ev, dtype, channel_major=False, device="cpu"):
    """q, k, v, dout in ``dtype``; channel-major means the (B, C, tokens).transpose(1, 2) view."""
    def one(n, c):
        if channel_major:
            return torch.randn(B, c, n, device=device).to(dtype).transpose(1, 2)
        return torch.randn(B, n, c, device=device).to(dtype)
    return one(N, E), one(Nk, E), one(Nk, Ev), torch.randn(B, N, Ev, device=device).to(dtype)


def _fwd_bwd(fn, q, k, v, dout, dtype=None):
    """out, dq, dk, dv of ``fn``, with inputs cast to ``dtype`` (fresh leaves, strides kept)."""
    leaves = []
    for t in (q, k, v):
        t = t.detach()
        if dtype is not None and dtype != t.dtype:
            t = t.to(dtype)
        else:
            t = t.clone(memory_format=torch.preserve_format)
        leaves.append(t.requires_grad_())
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return (out, *(t.grad for t in leaves))


def _check_against_fp64(ours, q, k, v, dout, scale, dtype):
    ref = _fwd_bwd(lambda a, b, c: reference.sagan_attention(a, b, c, scale), q, k, v, dout, torch.float64)
    tol = TOLERANCES[dtype]
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        atol, rtol = tol["out"] if name == "out" else tol["grad"]
        assert_close_report(a, r, atol=atol, rtol=rtol, name=f"{name} ({DTYPE_IDS[dtype]})")


# ------------------------------------------------------------------------------------------------
# Correctness in the interpreter (CPU) or on the GPU when there is one
# ------------------------------------------------------------------------------------------------

def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def deterministic(request):
    """torch.use_deterministic_algorithms(request.param) for the test, restored after."""
    old = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(request.param, warn_only=True)
    yield request.param
    torch.use_deterministic_algorithms(old[0], warn_only=old[1])


DQ_MODES = dict(argnames="deterministic", argvalues=[False, True], ids=["atomic-dq", "deterministic"],
                indirect=True)


@pytest.mark.parametrize(**DQ_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_forward_and_grads_match_float64_reference(shape, dtype, deterministic):
    q, k, v, dout = _make(*shape, dtype, device=_device())
    scale = 1.0 if shape[3] != 17 else 0.6  # SAGAN's unscaled form, and one scaled case
    ours = _fwd_bwd(lambda a, b, c: tri.sagan_attention(a, b, c, scale), q, k, v, dout)
    assert ours[0].dtype == dtype and all(g.dtype == dtype for g in ours[1:])
    _check_against_fp64(ours, q, k, v, dout, scale, dtype)


def test_logsumexp_matches_reference():
    q, k, v, _ = _make(1, 63, 37, 24, 40, torch.float32, device=_device())
    _, lse = tri.sagan_attention_with_lse(q, k, v, 0.8)
    expected = reference.sagan_attention_lse(q.double(), k.double(), 0.8)
    assert_close_report(lse, expected, atol=1e-5, rtol=1e-6, name="lse")


@pytest.mark.parametrize(**DQ_MODES)
@pytest.mark.parametrize("Ev", [24, 40], ids=["fused-dkdv", "split-dv-dk"])
def test_channel_major_and_other_strided_inputs_are_read_in_place(Ev, deterministic):
    """The 1x1-conv view (B, C, N).transpose(1, 2), a stride-0 batch and a sliced feature axis."""
    B, N, Nk, E = 2, 45, 33, 12
    q, k, v, dout = _make(B, N, Nk, E, Ev, torch.float32, channel_major=True, device=_device())
    assert not q.is_contiguous() and q.stride(1) == 1
    ours = _fwd_bwd(tri.sagan_attention, q, k, v, dout)
    _check_against_fp64(ours, q, k, v, dout, 1.0, torch.float32)
    out, dq, dk, dv = ours
    # Channel-major values give a channel-major output: (B, Ev, N) contiguous after transposing.
    assert out.transpose(1, 2).is_contiguous()
    # Gradients come back in their input's layout (the conv backward gets (B, C, N) contiguous).
    assert dq.stride() == q.stride() and dk.stride() == k.stride() and dv.stride() == v.stride()

    wide = torch.randn(1, Nk, 2 * E, device=_device())
    k_sliced = wide[:, :, ::2]                                   # feature stride 2
    k_expanded = k_sliced.expand(B, Nk, E)                       # batch stride 0
    q2 = torch.randn(B, N, E, device=_device())
    v2 = torch.randn(B, Nk, Ev, device=_device())
    got = tri.sagan_attention(q2, k_expanded, v2)
    want = reference.sagan_attention(q2.double(), k_expanded.double(), v2.double())
    assert_close_report(got, want, atol=2e-5, rtol=2e-5, name="out (sliced, expanded k)")


def test_float64_gradcheck():
    """fp64 through the same kernels (fp64 accumulators): analytic vs numerical gradients."""
    kw = dict(dtype=torch.float64, device=_device(), requires_grad=True)
    q, k, v = torch.randn(1, 9, 5, **kw), torch.randn(1, 11, 5, **kw), torch.randn(1, 11, 6, **kw)
    assert torch.autograd.gradcheck(lambda a, b, c: tri.sagan_attention(a, b, c, 0.7), (q, k, v),
                                    fast_mode=True)


def test_fp32_precision_choice(monkeypatch):
    """IEEE fp32 dots by default (the precision that meets the 2x-PyTorch rule); TF32 on request."""
    assert tri.resolve_fp32_precision(None) == "ieee"
    monkeypatch.setenv("SAGAN_FAST_TRITON_FP32_PRECISION", "tf32x3")
    assert tri.resolve_fp32_precision(None) == "tf32x3"
    torch.backends.cuda.matmul.allow_tf32 = True   # restored by conftest's fixture
    try:
        assert tri.resolve_fp32_precision(None) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert tri._input_precision(torch.float32, "tf32") == "tf32"
    assert tri._input_precision(torch.float16, "tf32") == "ieee"
    with pytest.raises(ValueError, match="fp32_precision 'tf16'"):
        tri.resolve_fp32_precision("tf16")
    q, k, v, _ = _make(1, 20, 20, 16, 16, torch.float32, device=_device())
    want = reference.sagan_attention(q.double(), k.double(), v.double())
    for precision in tri.FP32_PRECISIONS:
        out = tri.sagan_attention(q, k, v, fp32_precision=precision)
        # TF32 keeps 10 mantissa bits: ~1e-3 relative error on O(1) outputs (exact in the interpreter).
        assert_close_report(out, want, atol=1e-2, rtol=1e-2, name=f"out ({precision})")


def _gpu_launch_path(monkeypatch):
    """Take the GPU path (candidate configs, tuning, fused dk + dv choice) while still interpreting."""
    monkeypatch.setattr(tri, "_interpreted", lambda t: False)
    monkeypatch.setattr(tri, "_TUNED", {})
    monkeypatch.setattr(tri, "_TUNED_MS", {})
    monkeypatch.setattr(tri, "_PATHS", {})


def _gpu_paths(dtype):
    q, k, v, _ = _make(1, 8, 8, 8, 72, dtype, device="meta")
    interpreted = tri._interpreted
    tri._interpreted = lambda t: False
    try:
        return tri.backward_paths(q, k, v)
    finally:
        tri._interpreted = interpreted


@pytest.mark.parametrize("dtype, path",
                         [(d, p) for d in (torch.float32, torch.float16) for p in _gpu_paths(d)],
                         ids=lambda x: DTYPE_IDS.get(x, x))
def test_every_gpu_launch_candidate_computes_the_same_result(monkeypatch, dtype, path):
    """Every backward path the GPU may take (fused or split dk / dv; dq by atomics or its own
    kernel) with each of the tuner's candidates (128-row blocks, value slices up to 128 / 256,
    dO v^T in one chunk or several) gives the float64 result."""
    _gpu_launch_path(monkeypatch)
    monkeypatch.setattr(tri, "backward_paths", lambda q, k, v, deterministic=None: [path])
    original = tri._candidate_configs
    shape = (1, 70, 45, 24, 72)   # Ev = 72: one 128 slice or two 64 slices; N, Nk not block multiples
    q, k, v, dout = _make(*shape, dtype, device=_device())
    kinds = ["fwd", "dkdv" if path.startswith("fused") else "dv"]
    kinds += ["dq"] if path.endswith("dq-kernel") else []
    kinds += [] if path.startswith("fused") else ["dk"]
    longest = max(len(original(kind, shape[3], shape[4], dtype)) for kind in kinds)
    launched = []
    run = tri.Launch.run
    monkeypatch.setattr(tri.Launch, "run", lambda self, config: (launched.append((self.kind, config)),
                                                                 run(self, config)))
    for i in range(longest):
        def only_ith(kind, E, Ev, dtype, i=i):
            cands = original(kind, E, Ev, dtype)
            return [cands[min(i, len(cands) - 1)]]
        monkeypatch.setattr(tri, "_candidate_configs", only_ith)
        tri._TUNED.clear()
        ours = _fwd_bwd(tri.sagan_attention, q, k, v, dout)
        _check_against_fp64(ours, q, k, v, dout, 1.0, dtype)
    for kind in kinds:   # every candidate of every kernel of the path ran
        ran = [c for kd, c in launched if kd == kind]
        assert all(c in ran for c in original(kind, shape[3], shape[4], dtype)), kind


def test_tuner_keeps_the_fastest_candidate_and_skips_failures(monkeypatch):
    import triton.testing
    _gpu_launch_path(monkeypatch)
    calls = []

    def fake_do_bench(fn, warmup=25, rep=100):
        calls.append(fn)
        if len(calls) == 2:
            raise RuntimeError("out of resources")   # a candidate that does not fit is skipped
        fn()
        return 10.0 - len(calls)                     # later candidates are "faster"
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    q, k, v, _ = _make(1, 33, 20, 16, 40, torch.float32, device=_device())
    out = tri.sagan_attention(q, k, v)
    assert_close_report(out, reference.sagan_attention(q.double(), k.double(), v.double()),
                        atol=2e-5, rtol=2e-5, name="out")
    candidates = tri._candidate_configs("fwd", 16, 40, torch.float32)
    assert len(candidates) > 2 and len(calls) == len(candidates)
    (key, chosen), = tri._TUNED.items()
    assert key[0] == "fwd" and chosen == candidates[-1]
    # Backward in fp16: the fused dk + dv path and the split one are both timed on first use, the
    # faster kept. dq sums by atomics: the extra timing runs must not stay in it.
    calls.clear()
    q16, k16, v16, dout16 = _make(1, 33, 20, 16, 40, torch.float16, device=_device())
    ours = _fwd_bwd(tri.sagan_attention, q16, k16, v16, dout16)
    _check_against_fp64(ours, q16, k16, v16, dout16, 1.0, torch.float16)
    (path_key, path), = tri._PATHS.items()
    assert path_key[0] == "bwd-path" and path in ("fused+atomic-dq", "split+atomic-dq")
    assert {key[0] for key in tri._TUNED} >= {"fwd", "dkdv", "dv", "dk"}
    tri._TUNED.clear()
    monkeypatch.setenv("SAGAN_FAST_TRITON_AUTOTUNE", "0")
    tri.sagan_attention(q, k, v)
    assert next(iter(tri._TUNED.values())) == candidates[0]


def _launched_kernels(monkeypatch):
    launched = []
    run = tri.Launch.run
    monkeypatch.setattr(tri.Launch, "run", lambda self, config: (launched.append(self), run(self, config)))
    return launched


@pytest.mark.parametrize(**DQ_MODES)
def test_deterministic_mode_sums_dq_without_atomics(monkeypatch, deterministic):
    """Atomic dq by default; under torch.use_deterministic_algorithms(True) the dq kernel, and two
    runs give bitwise equal gradients (on a GPU the atomic path need not)."""
    launched = _launched_kernels(monkeypatch)
    q, k, v, dout = _make(2, 45, 37, 16, 24, torch.float16, channel_major=True, device=_device())
    first = _fwd_bwd(tri.sagan_attention, q, k, v, dout)
    kinds = [x.kind for x in launched]
    atomics = [x for x in launched if x.constexprs.get("ATOMIC_DQ")]
    if deterministic:
        assert "dq" in kinds and not atomics
        second = _fwd_bwd(tri.sagan_attention, q, k, v, dout)
        for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
            assert torch.equal(a, b), f"{name} differs between two deterministic runs"
    else:
        assert "dq" not in kinds and [x.kind for x in atomics] == ["dkdv"]
    _check_against_fp64(first, q, k, v, dout, 1.0, torch.float16)


def test_backward_flops_approach_three_and_a_half_forwards():
    """DESIGN.md's anchor (B=64, N=Nk=1024, E=32, Ev=256): fwd 2 B N Nk (E + Ev) = 38.7 GFLOP;
    the default backward (fused dk + dv, atomic dq) adds 2 B N Nk (3 E + 2 Ev): 3.1x in all;
    the deterministic one recomputes q k^T and dO v^T for dq: 4.1x."""
    q, k, v, _ = _make(64, 1024, 1024, 32, 256, torch.bfloat16, device="meta")
    B, N, Nk, E, Ev = 64, 1024, 1024, 32, 256
    fwd = 2.0 * B * N * Nk * (E + Ev)
    interpreted = tri._interpreted
    tri._interpreted = lambda t: False
    try:
        default = tri.plan_costs(q, k, v, backward_path="fused+atomic-dq")
        deterministic = tri.plan_costs(q, k, v, backward_path="fused+dq-kernel")
    finally:
        tri._interpreted = interpreted
    assert sum(r["flops"] for r in default if r["phase"] == "fwd") == pytest.approx(fwd)
    total = sum(r["flops"] for r in default) / fwd
    assert total == pytest.approx((4 * E + 3 * Ev) / (E + Ev), rel=1e-3) and total <= 3.5
    expected = (5 * E + 4 * Ev) / (E + Ev)
    assert sum(r["flops"] for r in deterministic) / fwd == pytest.approx(expected, rel=1e-3)
    assert [r["kernel"] for r in default] == ["_attn_fwd_kernel", "_attn_bwd_delta_kernel",
                                              "_attn_bwd_dkdv_kernel +atomic dq",
                                              "dq copy (fp32 -> dq dtype)"]
    assert all(r["bytes"] > 0 for r in default)


def _broadcast_worker(rank, world, init_file, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tri.import_tuning({"configs": [(("fwd", "card", torch.float16, "ieee", 9, 9, 8, 8, "rrr"),
                                        dict(BLOCK_M=rank + 16, BLOCK_N=32, BLOCK_DV=32, num_warps=4,
                                             num_stages=1))],
                           "paths": [(("bwd-path", "card", rank), f"path of rank {rank}")]})
        held = tri.broadcast_tuning()
        results[rank] = (held, tri.export_tuning())
    finally:
        dist.destroy_process_group()


def test_broadcast_tuning_gives_every_rank_rank_zeros_table(tmp_path):
    """DDP: rank 0's tuned settings replace every other rank's (gloo, two processes)."""
    import torch.multiprocessing as mp
    assert tri.broadcast_tuning() == len(tri._TUNED) + len(tri._PATHS)   # no process group: no-op
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_broadcast_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
        results = dict(results)
    assert results[0][1] == results[1][1] and results[1][0] == 2
    (key, config), = results[1][1]["configs"]
    assert config["BLOCK_M"] == 16 and results[1][1]["paths"] == [(("bwd-path", "card", 0), "path of rank 0")]
    with pytest.raises(ValueError, match="export_tuning"):
        tri.import_tuning({"configs": []})


# ------------------------------------------------------------------------------------------------
# Input errors, before any launch
# ------------------------------------------------------------------------------------------------

def _qkv(B=1, N=8, Nk=6, E=4, Ev=5, dtype=torch.float32, device=None):
    kw = dict(dtype=dtype, device=device or _device())
    return torch.randn(B, N, E, **kw), torch.randn(B, Nk, E, **kw), torch.randn(B, Nk, Ev, **kw)


@pytest.mark.parametrize("case, exc, match", [
    ("rank", ValueError, "must be 3-D"),
    ("E mismatch", ValueError, "feature size E"),
    ("Nk mismatch", ValueError, "same number of keys"),
    ("batch mismatch", ValueError, "batch sizes differ"),
    ("dtype mismatch", TypeError, "share a dtype"),
    ("int dtype", TypeError, "dtype torch.int64"),
    ("E too large", ValueError, "E=129 exceeds"),
    ("Ev too large", ValueError, "Ev=513 exceeds"),
    ("bf16 in interpreter", TypeError, "bfloat16 is not supported under the Triton CPU interpreter"),
    ("empty", ValueError, "empty input"),
    ("batch too large", ValueError, "batch 65536 exceeds"),
    ("device mismatch", ValueError, "one device"),
])
def test_bad_inputs_raise_clear_errors(case, exc, match):
    q, k, v = _qkv()
    if case == "rank":
        q = q[0]
    elif case == "E mismatch":
        k = torch.randn(1, 6, 3, device=q.device)
    elif case == "Nk mismatch":
        v = torch.randn(1, 7, 5, device=q.device)
    elif case == "batch mismatch":
        v = torch.randn(2, 6, 5, device=q.device)
    elif case == "dtype mismatch":
        v = v.half()
    elif case == "int dtype":
        q, k, v = (t.long() for t in (q, k, v))
    elif case == "E too large":
        q, k, v = _qkv(E=129)
    elif case == "Ev too large":
        q, k, v = _qkv(Ev=513)
    elif case == "bf16 in interpreter":
        if torch.cuda.is_available():
            pytest.skip("bf16 runs on a GPU")
        q, k, v = _qkv(dtype=torch.bfloat16)
    elif case == "empty":
        q, k, v = _qkv(N=0)
    elif case == "batch too large":
        q, k, v = (t.expand(65536, -1, -1) for t in _qkv())   # stride-0 batch: no memory
    elif case == "device mismatch":
        k = k.to("meta")
    with pytest.raises(exc, match=match):   # the public entry checks once, then the backend its limits
        attention_ops.sagan_attention(q, k, v, backend="triton")


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv(device="cpu")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        attention_ops.sagan_attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="CUDA device"):
        tri.sagan_attention(q, k, v)


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts calls into the Triton backend module (the dispatcher looks it up at each call)."""
    calls = []
    original = tri.sagan_attention

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)
    monkeypatch.setattr(tri, "sagan_attention", spy)
    return calls


def test_environment_variable_selects_the_backend(monkeypatch, triton_calls):
    q, k, v = _qkv()
    expected = reference.sagan_attention(q, k, v)
    monkeypatch.setenv("SAGAN_FAST_BACKEND", "triton")
    assert_close_report(attention_ops.sagan_attention(q, k, v), expected, atol=1e-5, rtol=1e-5, name="out")
    assert len(triton_calls) == 1
    monkeypatch.setenv("SAGAN_FAST_BACKEND", "reference")
    attention_ops.sagan_attention(q, k, v)
    assert len(triton_calls) == 1
    monkeypatch.setenv("SAGAN_FAST_BACKEND", "auto")
    attention_ops.sagan_attention(q, k, v)
    # auto keeps CPU tensors on the reference path (the interpreter is for tests, not speed).
    assert len(triton_calls) == (1 if q.device.type == "cpu" else 2)
    monkeypatch.setenv("SAGAN_FAST_BACKEND", "tritn")
    with pytest.raises(ValueError, match=r"unknown backend 'tritn' \(from \$SAGAN_FAST_BACKEND\); expected one of"):
        attention_ops.sagan_attention(q, k, v)


def test_auto_leaves_the_unmeasured_cuda_attention_out():
    """The CUDA C++ attention (per-warp WMMA) has never been timed against naive PyTorch on a GPU:
    `auto` must not pick it over the reference until bench/attention.py has measured it."""
    from sagan_fast.ops._backend import AUTO_ORDER

    assert AUTO_ORDER["sagan_attention"] == ("triton",)


# ------------------------------------------------------------------------------------------------
# torch.library registration, torch.compile
# ------------------------------------------------------------------------------------------------

def test_opcheck_forward_and_backward_ops():
    q, k, v, dout = _make(1, 19, 11, 8, 20, torch.float32, channel_major=True, device=_device())
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(tri.attention_fwd, (q, k, v, 1.0, "ieee"))
    out, lse = tri.attention_fwd(q.detach(), k.detach(), v.detach(), 1.0, "ieee")
    torch.library.opcheck(tri.attention_bwd,
                          (dout, q.detach(), k.detach(), v.detach(), out, lse, 1.0, "ieee"))


def test_torch_compile_traces_the_op_forward_and_backward():
    """aot_eager checks the fake kernels and the autograd registration without a C++ compiler."""
    torch._dynamo.reset()

    def block(q, k, v):
        return (tri.sagan_attention(q * 2.0, k, v, 0.5) + 1.0).relu()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    q, k, v, dout = _make(1, 21, 13, 8, 20, torch.float32, channel_major=True, device=_device())
    got = _fwd_bwd(compiled, q, k, v, dout)
    want = _fwd_bwd(block, q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close_report(a, b, atol=1e-6, rtol=1e-6, name=name)


# ------------------------------------------------------------------------------------------------
# SelfAttention2d on the Triton backend vs the reference backend
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["paper", "biggan"])
def test_self_attention_2d_triton_matches_reference(form):
    C = 16
    kwargs = dict(paper={}, biggan=dict(pool_keys=True, value_channels=C // 2, out_conv=True))[form]
    torch.manual_seed(1)
    mod_ref = SelfAttention2d(C, backend="reference", **kwargs).to(_device())
    mod_tri = SelfAttention2d(C, backend="triton", **kwargs).to(_device())
    with torch.no_grad():
        mod_ref.gamma.fill_(0.7)   # gamma = 0 at init would hide the attention branch entirely
    mod_tri.load_state_dict(mod_ref.state_dict())
    x = torch.randn(1, C, 7, 9, device=_device())
    ys, grads = [], []
    for mod in (mod_ref, mod_tri):
        xi = x.clone().requires_grad_()
        y = mod(xi)
        y.square().sum().backward()
        ys.append(y)
        grads.append([xi.grad] + [p.grad for p in mod.parameters()])
    assert_close_report(ys[1], ys[0], atol=1e-5, rtol=1e-5, name=f"y ({form})")
    names = ["x"] + [n for n, _ in mod_ref.named_parameters()]
    for name, a, b in zip(names, grads[1], grads[0]):
        assert_close_report(a, b, atol=1e-4, rtol=1e-4, name=f"grad {name} ({form})")


@pytest.mark.parametrize("form", ["paper", "biggan", "paper-unfused"])
def test_self_attention_2d_matches_functional_reference(form):
    """The module (Triton backend, fused projections) against reference.self_attention_2d with the
    same spectrally normalized weights; "unfused": a hooked conv takes the one-conv-each path."""
    C = 16
    biggan = form == "biggan"
    kwargs = dict(pool_keys=True, value_channels=C // 2, out_conv=True) if biggan else {}
    mod = SelfAttention2d(C, backend="triton", **kwargs).to(_device())
    calls = []
    if form == "paper-unfused":
        mod.value.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        mod.gamma.fill_(0.3)
    x = torch.randn(2, C, 6, 10, device=_device())
    y = mod(x)
    assert len(calls) == (1 if form == "paper-unfused" else 0)
    mod.eval()   # the weights the forward used (SN updates u, v only when the weight changes)
    with torch.no_grad():
        weights = [m.weight.double() if m is not None else None
                   for m in (mod.query, mod.key, mod.value, mod.out)]
    want = reference.self_attention_2d(x.double(), *weights[:3], mod.gamma.double(), weights[3],
                                       pool_keys=biggan)
    assert_close_report(y, want, atol=1e-5, rtol=1e-5, name=f"y ({form})")


# ------------------------------------------------------------------------------------------------
# Real GPU: DESIGN.md shapes, error within 2x PyTorch's own, memory O(N) per row
# ------------------------------------------------------------------------------------------------

# (B, N, Nk, E, Ev); batch reduced from the benchmark's so that the float64 reference fits.
GPU_SHAPES = {
    "G32x32-C256": (8, 1024, 1024, 32, 256),
    "G32x32-C256-biggan-pooled": (8, 1024, 256, 32, 128),
    "D32x32-C512": (4, 1024, 1024, 64, 512),
    "G64x64-C128": (2, 4096, 4096, 16, 128),
}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("channel_major", [False, True], ids=["row-major", "channel-major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", list(GPU_SHAPES.values()), ids=list(GPU_SHAPES))
def test_gpu_error_within_twice_pytorch_naive(shape, dtype, channel_major):
    q, k, v, dout = _make(*shape, dtype, channel_major=channel_major, device="cuda")
    ours = _fwd_bwd(tri.sagan_attention, q, k, v, dout)
    naive = _fwd_bwd(reference.sagan_attention, q, k, v, dout)
    ref = _fwd_bwd(reference.sagan_attention, q, k, v, dout, torch.float64)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, naive, ref):
        # floor: a few fp32 ulps of the largest value, for cases where PyTorch happens to be exact.
        floor = 4 * torch.finfo(torch.float32).eps * r.abs().max().item()
        assert_within_factor_of_torch(a, b, r, factor=2.0, floor=floor, name=f"{name} {DTYPE_IDS[dtype]}")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(**DQ_MODES)
def test_gpu_design_shape_both_dq_modes(deterministic):
    """bf16 at the DESIGN shape (batch 8), channel-major as SelfAttention2d passes it: within 2x of
    PyTorch's error either way; deterministic mode bitwise reproducible."""
    q, k, v, dout = _make(8, 1024, 1024, 32, 256, torch.bfloat16, channel_major=True, device="cuda")
    ours = _fwd_bwd(tri.sagan_attention, q, k, v, dout)
    naive = _fwd_bwd(reference.sagan_attention, q, k, v, dout)
    ref = _fwd_bwd(reference.sagan_attention, q, k, v, dout, torch.float64)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, naive, ref):
        floor = 4 * torch.finfo(torch.float32).eps * r.abs().max().item()
        assert_within_factor_of_torch(a, b, r, factor=2.0, floor=floor, name=f"{name} bf16")
    if deterministic:
        again = _fwd_bwd(tri.sagan_attention, q, k, v, dout)
        for name, a, b in zip(("out", "dq", "dk", "dv"), ours, again):
            assert torch.equal(a, b), f"{name} differs between two deterministic runs"


@pytest.mark.gpu
@requires_cuda
def test_gpu_peak_memory_is_linear_in_tokens():
    """fwd+bwd allocates O(B N (E + Ev)), never anything like the B x N x Nk score matrix."""
    B, N, Nk, E, Ev = 4, 4096, 4096, 16, 128
    q, k, v, dout = _make(B, N, Nk, E, Ev, torch.bfloat16, device="cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    tri.sagan_attention(q, k, v).backward(dout)   # warm-up: compile outside the measurement
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tri.sagan_attention(q, k, v).backward(dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    scores_bytes = B * N * Nk * 2
    io_bytes = sum(t.numel() * t.element_size() for t in (q, k, v, dout))
    # out + dq + dk + dv ~ io_bytes, plus lse and delta (8 bytes a row) and allocator rounding.
    assert peak <= 2 * io_bytes + 16 * B * N + (4 << 20), (peak, io_bytes)
    assert peak < scores_bytes / 20, (peak, scores_bytes)


@pytest.mark.gpu
@requires_cuda
def test_gpu_auto_backend_picks_triton(triton_calls):
    q, k, v, _ = _make(2, 64, 64, 16, 32, torch.float16, device="cuda")
    attention_ops.sagan_attention(q, k, v, backend="auto")
    assert len(triton_calls) == 1


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("precision, bound", [("tf32", 1e-2), ("tf32x3", 1e-4)])
def test_gpu_fp32_precision_options_error(precision, bound):
    """TF32 (10-bit mantissa products) ~1e-3; tf32x3 must be far closer to fp32 than TF32 alone."""
    q, k, v, dout = _make(4, 1024, 1024, 32, 256, torch.float32, device="cuda")
    ours = _fwd_bwd(lambda a, b, c: tri.sagan_attention(a, b, c, fp32_precision=precision), q, k, v, dout)
    ref = _fwd_bwd(reference.sagan_attention, q, k, v, dout, torch.float64)
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        rel = ((a.double() - r).abs().max() / r.abs().max()).item()
        assert rel < bound, f"{name} ({precision}): relative error {rel:.3g} >= {bound:g}"
