"""The compiled extension sagan_fast._C (the ``cuda`` backend).

On a machine with no GPU this tests its C++ CPU implementations: the op schemas, the dispatch, the
Python autograd / fake registrations (``sagan_fast.ops.cuda``) and the math the CUDA kernels share
with them (sigma = |W^T u|^2 / max(|W^T u|, eps), attention backward by recomputation from the
stored logsumexp). Tests marked ``gpu`` run the CUDA kernels against the float64 reference and the
Triton backend on the DESIGN.md shapes.
"""

from __future__ import annotations

import pytest
import torch

from sagan_fast.ops import reference, sagan_attention, spectral_norm_normalize, spectral_norm_power_iteration_
from tests.utils import assert_close_report, assert_within_factor_of_torch, requires_cuda

_C = pytest.importorskip("sagan_fast._C", reason="extension not built (python setup.py build_ext --inplace)")
cuda_backend = pytest.importorskip("sagan_fast.ops.cuda")
ops = torch.ops.sagan_fast

# Tolerances against the float64 reference. float64: both sides do the same O(n) float64 sums in
# different orders, so ~1e-15 relative; 1e-10 leaves room and still catches any formula error.
# float32: the kernels/C++ accumulate in float32 over at most a few hundred terms here, ~1e-6
# relative; 1e-4 / 1e-5 allows the exp() amplification in softmax. 16-bit: rounding of inputs and
# outputs dominates, so they are judged against PyTorch's own error in that dtype (flash-attention's rule).
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-4)}


def _attention_inputs(B, N, Nk, E, Ev, dtype, device="cpu", strided=False):
    if strided:  # (B, E, N) storage read through a transposed view, as SelfAttention2d passes it
        q = torch.randn(B, E, N, dtype=torch.float64).transpose(1, 2)
        k = torch.randn(B, E, Nk, dtype=torch.float64).transpose(1, 2)
        v = torch.randn(B, Ev, Nk, dtype=torch.float64).transpose(1, 2)
    else:
        q = torch.randn(B, N, E, dtype=torch.float64)
        k = torch.randn(B, Nk, E, dtype=torch.float64)
        v = torch.randn(B, Nk, Ev, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def _reference_attention(q, k, v, scale, grad_out):
    """Forward and gradients of the reference in float64 (inputs cast up first)."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference.sagan_attention(q64, k64, v64, scale=scale)
    out.backward(grad_out.double())
    return out, q64.grad, k64.grad, v64.grad


# --------------------------------------------------------------------------------------------
# The module's plain functions used by sagan_fast.ops._backend
# --------------------------------------------------------------------------------------------

def test_module_functions():
    assert isinstance(_C.built_with_cuda(), bool)
    for name in ("sagan_attention", "spectral_norm_power_iteration", "spectral_norm_normalize"):
        assert _C.has_op(name) is True
    assert _C.has_op("no_such_op") is False
    with pytest.raises(TypeError):
        _C.has_op(3)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------

ATTENTION_SHAPES = [  # (B, N, Nk, E, Ev): odd on purpose, batch 1, E != Ev, Nk < N and Nk > N
    (1, 37, 37, 5, 11),
    (3, 19, 45, 8, 13),
    (2, 70, 17, 3, 24),
]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "B{}-N{}-Nk{}-E{}-Ev{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "transposed"])
def test_attention_matches_reference(shape, dtype, strided):
    scale = 0.37
    q, k, v = _attention_inputs(*shape, dtype=dtype, strided=strided)
    out = sagan_attention(q, k, v, scale=scale, backend="cuda")
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_out, ref_dq, ref_dk, ref_dv = _reference_attention(q, k, v, scale, grad_out)
    assert out.dtype == dtype
    for name, got, want in (("out", out, ref_out), ("dq", q.grad, ref_dq), ("dk", k.grad, ref_dk),
                            ("dv", v.grad, ref_dv)):
        assert_close_report(got, want, name=name, **TOL[dtype])


def test_attention_logsumexp_and_direct_op():
    q, k, v = (t.detach() for t in _attention_inputs(2, 23, 29, 7, 10, torch.float64))
    out, lse = ops.ext_sagan_attention_forward(q, k, v, 1.5)
    assert lse.dtype == torch.float64 and lse.shape == (2, 23)
    assert_close_report(lse, reference.sagan_attention_lse(q, k, 1.5), name="lse", **TOL[torch.float64])
    assert_close_report(out, reference.sagan_attention(q, k, v, 1.5), name="out", **TOL[torch.float64])
    _, lse32 = ops.ext_sagan_attention_forward(q.float(), k.float(), v.float(), 1.0)
    assert lse32.dtype == torch.float32  # float32 logsumexp for float32 (and 16-bit) inputs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_attention_low_precision_within_factor_of_torch(dtype):
    q, k, v = _attention_inputs(2, 33, 41, 8, 12, dtype)
    out = sagan_attention(q, k, v, backend="cuda")
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref = _reference_attention(q, k, v, 1.0, grad_out)
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch_out = reference.sagan_attention(qt, kt, vt)
    torch_out.backward(grad_out)
    # floor: one ulp-scale rounding of the output in this dtype (16-bit eps ~ 1e-3 / 8e-3).
    floor = 4 * torch.finfo(dtype).eps
    for name, got, torch_same, want in (("out", out, torch_out, ref[0]), ("dq", q.grad, qt.grad, ref[1]),
                                        ("dk", k.grad, kt.grad, ref[2]), ("dv", v.grad, vt.grad, ref[3])):
        assert got.dtype == dtype
        assert_within_factor_of_torch(got, torch_same, want, factor=2.0, floor=floor, name=name)


def test_attention_gradcheck_float64():
    q, k, v = _attention_inputs(2, 6, 5, 3, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: sagan_attention(a, b, c, scale=0.8, backend="cuda"), (q, k, v))


def test_attention_opcheck():
    q, k, v = (t.detach() for t in _attention_inputs(2, 9, 7, 3, 5, torch.float32))
    torch.library.opcheck(ops.ext_sagan_attention_forward.default, (q, k, v, 0.5))
    out, lse = ops.ext_sagan_attention_forward(q, k, v, 0.5)
    torch.library.opcheck(ops.ext_sagan_attention_backward.default, (torch.randn_like(out), q, k, v, out, lse, 0.5))


def test_attention_bad_inputs_raise_before_work():
    q, k, v = (t.detach() for t in _attention_inputs(1, 5, 6, 4, 3, torch.float32))
    with pytest.raises(RuntimeError, match="share the feature size E"):
        ops.ext_sagan_attention_forward(q, k[..., :3], v, 1.0)
    with pytest.raises(RuntimeError, match="same number of keys"):
        ops.ext_sagan_attention_forward(q, k, v[:, :5], 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.ext_sagan_attention_forward(q, k.double(), v, 1.0)
    with pytest.raises(RuntimeError, match="3-D"):
        ops.ext_sagan_attention_forward(q[0], k, v, 1.0)
    with pytest.raises(RuntimeError, match="dtype must be"):
        ops.ext_sagan_attention_forward(q.int(), k.int(), v.int(), 1.0)
    out, lse = ops.ext_sagan_attention_forward(q, k, v, 1.0)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        ops.ext_sagan_attention_backward(out, q, k, v, out, lse[:, :2], 1.0)


def test_self_attention_module_cuda_backend_matches_reference():
    from sagan_fast.nn import SelfAttention2d
    torch.manual_seed(1)
    layer = SelfAttention2d(16, value_channels=8, out_conv=True, pool_keys=True, backend="cuda").double()
    with torch.no_grad():
        layer.gamma.fill_(0.7)  # non-zero so the attention path reaches the output
    x = torch.randn(2, 16, 6, 10, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    got_x, got_params = x.grad.clone(), [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    layer.backend = "reference"
    y_ref = layer(x)
    y_ref.backward(grad)
    assert_close_report(y, y_ref, name="y", **TOL[torch.float64])
    assert_close_report(got_x, x.grad, name="dx", **TOL[torch.float64])
    for i, (got, p) in enumerate(zip(got_params, layer.parameters())):
        assert_close_report(got, p.grad, name=f"param{i}.grad", **TOL[torch.float64])


# --------------------------------------------------------------------------------------------
# Spectral norm
# --------------------------------------------------------------------------------------------

SN_WEIGHTS = [  # (shape, dim): linear, conv, transposed conv (dim 1), 1-row, embedding-like
    ((13, 7), 0),
    ((5, 3, 3, 3), 0),
    ((6, 11, 3, 3), 1),
    ((1, 9), 0),
    ((17, 4), 0),
]


def _sn_inputs(dtype, device="cpu"):
    weights, us, vs, dims = [], [], [], []
    for shape, dim in SN_WEIGHTS:
        w = torch.randn(shape, dtype=torch.float64)
        rows = shape[dim]
        weights.append(w.to(device=device, dtype=dtype))
        us.append(torch.nn.functional.normalize(torch.randn(rows, dtype=torch.float64), dim=0).to(device, dtype))
        vs.append(torch.nn.functional.normalize(torch.randn(w.numel() // rows, dtype=torch.float64),
                                                dim=0).to(device, dtype))
        dims.append(dim)
    return weights, us, vs, dims


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_iter", [1, 3])
def test_power_iteration_matches_reference(dtype, n_iter):
    weights, us, vs, dims = _sn_inputs(dtype)
    start_u, start_v = [u.double().clone() for u in us], [v.double().clone() for v in vs]
    sigmas = spectral_norm_power_iteration_(weights, us, vs, dims, n_power_iterations=n_iter, backend="cuda")
    assert sigmas.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert sigmas.shape == (len(weights),)
    # float32 accumulation over <= 100 terms: ~1e-6; the 16-bit u, v are then rounded once on storage.
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2 * torch.finfo(dtype).eps)
    for i, (w, d) in enumerate(zip(weights, dims)):
        mat = reference.weight_to_matrix(w.double(), d)
        ref_u, ref_v = reference.spectral_norm_power_iteration(mat, start_u[i], start_v[i], n_iter, 1e-12)
        ref_sigma = reference.spectral_norm_sigma(mat, ref_u, ref_v)
        assert_close_report(us[i], ref_u, atol=tol, rtol=tol, name=f"u[{i}]")
        assert_close_report(vs[i], ref_v, atol=tol, rtol=tol, name=f"v[{i}]")
        assert_close_report(sigmas[i], ref_sigma, atol=0, rtol=max(tol, 1e-5) if dtype != torch.float64 else tol,
                            name=f"sigma[{i}]")


def test_power_iteration_zero_weight_gives_zero_sigma_like_torch():
    w = torch.zeros(4, 3)
    u, v = torch.ones(4) / 2, torch.ones(3) / 3 ** 0.5
    sigma = spectral_norm_power_iteration_([w], [u], [v], [0], backend="cuda")
    assert sigma.item() == 0.0 and torch.all(u == 0) and torch.all(v == 0)  # eps floors the norms


def test_power_iteration_mixed_dtypes_keep_order():
    w32, w64 = torch.randn(5, 4), torch.randn(3, 6, dtype=torch.float64)
    u32, v32, u64, v64 = torch.randn(5), torch.randn(4), torch.randn(3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    sig = cuda_backend.power_iteration_([w32, w64], [u32, u64], [v32, v64], [0, 0], 1, 1e-12)
    assert sig.dtype == torch.float64
    assert_close_report(sig[0], torch.linalg.matrix_norm(w32.double(), 2), atol=0, rtol=1.0, name="sigma order")
    assert sig[1].item() == pytest.approx(reference.spectral_norm_sigma(w64, u64, v64).item(), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", range(len(SN_WEIGHTS)), ids=lambda i: "x".join(map(str, SN_WEIGHTS[i][0])))
def test_normalize_forward_backward_match_reference(dtype, case):
    weights, us, vs, dims = _sn_inputs(dtype)
    w, u, v, dim = weights[case].requires_grad_(), us[case], vs[case], dims[case]
    sigma = reference.spectral_norm_sigma(reference.weight_to_matrix(w.detach(), dim), u, v)
    w_sn = spectral_norm_normalize(w, u, v, sigma, dim=dim, backend="cuda")
    grad = torch.randn_like(w_sn)
    w_sn.backward(grad)
    w64 = w.detach().double().requires_grad_()
    ref = spectral_norm_normalize(w64, u.double(), v.double(), sigma.double(), dim=dim, backend="reference")
    ref.backward(grad.double())
    closed_form = reference.spectral_norm_backward(grad.double(), ref.detach(), u.double(), v.double(),
                                                   sigma.double(), dim)
    assert w_sn.dtype == dtype and w_sn.is_contiguous()
    assert_close_report(w_sn, ref, name="w_sn", **TOL[dtype])
    assert_close_report(w.grad, w64.grad, name="dW vs autograd of the reference", **TOL[dtype])
    assert_close_report(w.grad, closed_form, name="dW vs closed form", **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_normalize_low_precision(dtype):
    w = torch.randn(9, 5, 3, dtype=torch.float64)
    u, v = torch.randn(9, dtype=torch.float64), torch.randn(15, dtype=torch.float64)
    wl, ul, vl = w.to(dtype).requires_grad_(), u.to(dtype), v.to(dtype)
    sigma = reference.spectral_norm_sigma(reference.weight_to_matrix(wl.detach().float(), 0), ul.float(), vl.float())
    out = spectral_norm_normalize(wl, ul, vl, sigma, dim=0, backend="cuda")
    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    out.backward(grad)
    want = reference.spectral_norm_backward(grad.double(), wl.detach().double() / sigma.double(), ul.double(),
                                            vl.double(), sigma.double(), 0)
    # Computed in float32, rounded once to the 16-bit dtype: half an ulp of the value, plus slack.
    eps = torch.finfo(dtype).eps
    assert_close_report(out, wl.detach().double() / sigma.double(), atol=eps, rtol=eps, name="w_sn")
    assert_close_report(wl.grad, want, atol=4 * eps * want.abs().max().item(), rtol=eps, name="dW")


def test_normalize_gradcheck_float64():
    w = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    u, v = torch.randn(3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def fn(weight):  # sigma recomputed from the (perturbed) weight: the backward assumes sigma = u.W v
        sigma = reference.spectral_norm_sigma(reference.weight_to_matrix(weight.detach(), 1), u, v)
        return spectral_norm_normalize(weight, u, v, sigma, dim=1, backend="cuda")

    assert torch.autograd.gradcheck(fn, (w,))


def test_spectral_norm_opcheck():
    weights, us, vs, dims = _sn_inputs(torch.float32)
    torch.library.opcheck(ops.ext_spectral_norm_power_iteration_.default, (weights, us, vs, dims, 1, 1e-12))
    w, u, v = weights[2].requires_grad_(), us[2], vs[2]
    sigma = torch.tensor(2.5)
    torch.library.opcheck(ops.ext_spectral_norm_normalize.default, (w, u, v, sigma, 1))
    torch.library.opcheck(ops.ext_spectral_norm_normalize_backward.default,
                          (torch.randn_like(w), w.detach(), u, v, sigma, 1))


def test_spectral_norm_bad_inputs_raise():
    w, u, v = torch.randn(4, 6), torch.randn(4), torch.randn(6)
    with pytest.raises(RuntimeError, match="u must have shape"):
        ops.ext_spectral_norm_power_iteration_([w], [u[:3]], [v], [0], 1, 1e-12)
    with pytest.raises(RuntimeError, match="n_power_iterations must be positive"):
        ops.ext_spectral_norm_power_iteration_([w], [u], [v], [0], 0, 1e-12)
    with pytest.raises(RuntimeError, match="dim 2 out of range"):
        ops.ext_spectral_norm_normalize(w, u, v, torch.tensor(1.0), 2)
    with pytest.raises(RuntimeError, match="u and v must have the weight's dtype"):
        ops.ext_spectral_norm_normalize(w, u.double(), v, torch.tensor(1.0), 0)
    with pytest.raises(RuntimeError, match="sigma must hold one value"):
        ops.ext_spectral_norm_normalize(w, u, v, torch.ones(2), 0)
    with pytest.raises(RuntimeError, match="grad must have the weight's shape"):
        ops.ext_spectral_norm_normalize_backward(w[:2], w, u, v, torch.tensor(1.0), 0)


def test_spectral_norm_module_cuda_backend_matches_reference():
    from sagan_fast.nn.spectral_norm import spectral_norm
    torch.manual_seed(3)
    layers = {}
    for backend in ("cuda", "reference"):
        torch.manual_seed(3)  # same weights and same u, v draws
        layers[backend] = spectral_norm(torch.nn.ConvTranspose2d(5, 7, 3), backend=backend).double()
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    outs = {}
    for backend, layer in layers.items():
        y = layer(x)
        y.square().sum().backward()
        outs[backend] = (y, layer.parametrizations.weight.original.grad, layer.parametrizations.weight[0]._u)
    for name, got, want in zip(("y", "dW", "u"), outs["cuda"], outs["reference"]):
        assert_close_report(got, want, name=name, **TOL[torch.float64])


# --------------------------------------------------------------------------------------------
# On a GPU: the CUDA kernels (skipped without CUDA)
# --------------------------------------------------------------------------------------------

def _requires_cuda_kernels():
    if not _C.built_with_cuda():
        pytest.skip("sagan_fast._C was built without CUDA")


GPU_ATTENTION_SHAPES = [
    (1, 97, 97, 8, 8), (2, 257, 131, 16, 40), (2, 1025, 1025, 59, 111), (1, 33, 500, 128, 512),
    (4, 1024, 1024, 32, 256), (2, 1024, 256, 32, 128),  # DESIGN.md: SAGAN at 32x32; BigGAN pooled keys
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("shape", GPU_ATTENTION_SHAPES, ids=lambda s: "B{}-N{}-Nk{}-E{}-Ev{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "transposed"])
def test_gpu_attention_matches_reference(shape, dtype, strided):
    _requires_cuda_kernels()
    q, k, v = _attention_inputs(*shape, dtype=dtype, device="cuda", strided=strided)
    out = sagan_attention(q, k, v, scale=0.125, backend="cuda")
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref = _reference_attention(q, k, v, 0.125, grad_out)
    if dtype == torch.float64:
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), ref):
            assert_close_report(got, want, name=name, atol=1e-9, rtol=1e-9)
        return
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch_out = reference.sagan_attention(qt, kt, vt, scale=0.125)
    torch_out.backward(grad_out)
    # Our fp32 path is plain fp32 FMA (no TF32); 16-bit paths accumulate in fp32 on tensor cores.
    floor = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    for name, got, torch_same, want in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad),
                                           (torch_out, qt.grad, kt.grad, vt.grad), ref):
        assert_within_factor_of_torch(got, torch_same, want, factor=2.0, floor=floor, name=name)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_attention_is_bitwise_reproducible(dtype):
    """No atomics anywhere in the CUDA attention: two runs give the same bits (DESIGN shape, batch 4,
    channel-major as SelfAttention2d passes it: the plain-load path; row-major: cp.async)."""
    _requires_cuda_kernels()
    for strided in (True, False):
        runs = []
        for _ in range(2):
            torch.manual_seed(0)   # the same inputs and grad_out both times
            q, k, v = _attention_inputs(4, 1024, 1024, 32, 256, dtype, device="cuda", strided=strided)
            out = sagan_attention(q, k, v, backend="cuda")
            out.backward(torch.randn_like(out))
            runs.append((out.detach(), q.grad, k.grad, v.grad))
        for name, a, b in zip(("out", "dq", "dk", "dv"), *runs):
            assert torch.equal(a, b), f"{name} ({'transposed' if strided else 'contiguous'}) differs between runs"


@pytest.mark.gpu
@requires_cuda
def test_gpu_attention_matches_triton_backend():
    _requires_cuda_kernels()
    q, k, v = (t.detach() for t in _attention_inputs(4, 1024, 1024, 32, 256, torch.bfloat16, device="cuda"))
    ours = sagan_attention(q, k, v, backend="cuda").double()
    theirs = sagan_attention(q, k, v, backend="triton").double()
    ref = reference.sagan_attention(q.double(), k.double(), v.double())
    # Both are judged against fp64; they must agree with each other to within both errors.
    assert (ours - theirs).abs().max().item() <= 2 * ((ours - ref).abs().max() + (theirs - ref).abs().max()).item() + 1e-3


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_gpu_spectral_norm_matches_reference(dtype):
    _requires_cuda_kernels()
    shapes = [((1024, 1024, 3, 3), 0), ((64, 3, 3, 3), 0), ((1, 1024), 0), ((512, 256, 4, 4), 1),
              ((1000, 128), 0), ((3, 64, 3, 3), 0)]
    weights, us, vs, dims = [], [], [], []
    for shape, dim in shapes:
        w = torch.randn(shape, device="cuda", dtype=torch.float64).to(dtype)
        weights.append(w)
        us.append(torch.randn(shape[dim], device="cuda", dtype=torch.float64).to(dtype))
        vs.append(torch.randn(w.numel() // shape[dim], device="cuda", dtype=torch.float64).to(dtype))
        dims.append(dim)
    start = [(u.double().clone(), v.double().clone()) for u, v in zip(us, vs)]
    sigmas = spectral_norm_power_iteration_(weights, us, vs, dims, n_power_iterations=2, backend="cuda")
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 4 * torch.finfo(dtype).eps)
    for i, (w, d) in enumerate(zip(weights, dims)):
        mat = reference.weight_to_matrix(w.double(), d)
        ref_u, ref_v = reference.spectral_norm_power_iteration(mat, *start[i], 2, 1e-12)
        assert_close_report(us[i], ref_u, atol=tol, rtol=tol, name=f"u[{i}]")
        assert_close_report(vs[i], ref_v, atol=tol, rtol=tol, name=f"v[{i}]")
        assert_close_report(sigmas[i], reference.spectral_norm_sigma(mat, ref_u, ref_v), atol=0,
                            rtol=max(tol, 1e-6), name=f"sigma[{i}]")
        wg = w.clone().requires_grad_()
        w_sn = spectral_norm_normalize(wg, us[i], vs[i], sigmas[i], dim=d, backend="cuda")
        grad = torch.randn_like(w_sn)
        w_sn.backward(grad)
        want = reference.spectral_norm_backward(grad.double(), w.double() / sigmas[i].double(), us[i].double(),
                                                vs[i].double(), sigmas[i].double(), d)
        assert_close_report(w_sn, w.double() / sigmas[i].double(), atol=tol, rtol=tol, name=f"w_sn[{i}]")
        assert_close_report(wg.grad, want, atol=tol * want.abs().max().item(), rtol=tol, name=f"dW[{i}]")


def test_ops_trace_under_torch_compile():
    """fullgraph: the ext ops (fake kernels + registered autograd) trace without graph breaks."""
    q, k, v = _attention_inputs(2, 9, 11, 3, 5, torch.float64)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    u, vec = torch.randn(4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    sigma = reference.spectral_norm_sigma(w.detach(), u, vec)

    def step(q, k, v, w):
        out = sagan_attention(q, k, v, scale=0.5, backend="cuda")
        w_sn = spectral_norm_normalize(w, u, vec, sigma, dim=0, backend="cuda")
        return out.square().sum() + (w_sn * w_sn.flip(0)).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(q, k, v, w)
    loss.backward()
    got = [t.grad.clone() for t in (q, k, v, w)]
    for t in (q, k, v, w):
        t.grad = None
    step(q, k, v, w).backward()
    for i, t in enumerate((q, k, v, w)):
        assert_close_report(got[i], t.grad, name=f"grad[{i}]", **TOL[torch.float64])
