"""Spectral norm: ops (reference, triton) against the float64 reference, and the drop-in module
against torch's parametrization, state dicts, GAN-step autograd patterns and torch.compile.

On a CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1), so shapes
stay small; tests marked `gpu` repeat the kernel checks at SAGAN-128 sizes in fp32 and bf16.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sagan_fast.nn import SNConv2d, SNEmbedding, SNLinear
from sagan_fast.nn.spectral_norm import (SpectralNormError, check_spectral_norms, fuse_spectral_norms,
                                         set_check_finite, spectral_norm, spectral_norm_layers,
                                         update_spectral_norms)
from sagan_fast.ops import BackendUnavailableError, reference
from sagan_fast.ops.spectral_norm import (spectral_norm_normalize, spectral_norm_power_iteration_,
                                          spectral_norm_sigma)
from tests.sn_cases import BACKENDS, _cuda_reason, _triton_reason
from tests.utils import assert_close_report, requires_cuda

REPO = Path(__file__).resolve().parents[1]
# the module itself (sagan_fast.nn re-exports a function of the same name)
sn_mod = importlib.import_module("sagan_fast.nn.spectral_norm")

# (shape, dim, what it stands for): odd sizes on purpose; 1 x 1000 is a linear layer to one logit.
WEIGHTS = [
    ((37, 3, 5, 5), 0, "conv"),
    ((3, 37, 5, 5), 1, "conv_transpose"),
    ((1, 1000), 0, "linear_to_1"),
    ((29, 13), 0, "linear"),
    ((41, 23), 0, "embedding"),
    ((2, 3, 4, 5), 2, "dim2"),
]
WEIGHT_IDS = [w[2] for w in WEIGHTS]

# Tolerances against the float64 reference, per weight dtype. float64: same math, different
# summation order, so a few ulps of the O(1) results. float32: reductions of up to ~1000 products
# in fp32 give ~sqrt(1000) * 6e-8 relative error; 2e-5 leaves headroom but still fails on any
# wrong index or order (those give O(1e-2) errors). float16: u, v are stored in fp16 (2^-11
# relative rounding, 4.9e-4), reductions run in fp32.
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3}

_triton_ok = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs CUDA or TRITON_INTERPRET=1")


def _random_problem(shape, dim, dtype, device="cpu"):
    w = torch.randn(shape, dtype=torch.float64, device=device)
    rows = shape[dim]
    u = F.normalize(torch.randn(rows, dtype=torch.float64, device=device), dim=0)
    v = F.normalize(torch.randn(w.numel() // rows, dtype=torch.float64, device=device), dim=0)
    return w.to(dtype), u.to(dtype), v.to(dtype)


def _reference_update(w, u, v, dim, n_iter, eps=1e-12):
    """float64 u, v, sigma after the power iteration, from the (possibly low-precision) inputs."""
    mat = reference.weight_to_matrix(w.double(), dim)
    u2, v2 = reference.spectral_norm_power_iteration(mat, u.double(), v.double(), n_iter, eps)
    return u2, v2, reference.spectral_norm_sigma(mat, u2, v2)


@pytest.fixture
def small_programs(monkeypatch):
    """Force many row / column splits per weight, so the partial-sum paths run on small shapes."""
    from sagan_fast.ops.triton import spectral_norm as tsn
    monkeypatch.setattr(tsn, "_ELEMS_PER_PROGRAM", 256)
    monkeypatch.setattr(tsn, "_PLANS", {})


# ------------------------------------------------------------------------------------------------
# Ops vs the float64 reference
# ------------------------------------------------------------------------------------------------

@_triton_ok
@pytest.mark.parametrize("dtype,n_iter", [(torch.float64, 1), (torch.float32, 1), (torch.float16, 1),
                                          (torch.float32, 2)], ids=str)
def test_power_iteration_multi_tensor_matches_reference(dtype, n_iter):
    problems = [_random_problem(s, d, dtype) for s, d, _ in WEIGHTS]
    ws, us, vs = (list(x) for x in zip(*problems))
    dims = [d for _, d, _ in WEIGHTS]
    expected = [_reference_update(w, u, v, d, n_iter) for w, u, v, d in zip(ws, us, vs, dims)]
    sigmas = spectral_norm_power_iteration_(ws, us, vs, dims, n_power_iterations=n_iter, backend="triton")
    assert sigmas.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = TOL[dtype]
    for (_, _, name), u, v, sigma, (u_ref, v_ref, s_ref) in zip(WEIGHTS, us, vs, sigmas, expected):
        assert_close_report(u, u_ref, atol=tol, rtol=0, name=f"{name} u")
        assert_close_report(v, v_ref, atol=tol, rtol=0, name=f"{name} v")
        assert_close_report(sigma, s_ref, atol=0, rtol=tol, name=f"{name} sigma")


@_triton_ok
def test_power_iteration_with_partial_sums_matches_reference(small_programs):
    """Many programs per weight (split rows and columns), fp32, two iterations."""
    problems = [_random_problem(s, d, torch.float32) for s, d, _ in WEIGHTS]
    ws, us, vs = (list(x) for x in zip(*problems))
    dims = [d for _, d, _ in WEIGHTS]
    expected = [_reference_update(w, u, v, d, 2) for w, u, v, d in zip(ws, us, vs, dims)]
    from sagan_fast.ops.triton import spectral_norm as tsn
    sigmas = tsn.power_iteration_(ws, us, vs, dims, 2, 1e-12)
    plan = next(iter(tsn._PLANS.values()))
    assert plan.meta[:, 3].max() > 1 and plan.meta[:, 4].max() > 1, "the splits did not happen"
    for (_, _, name), u, v, sigma, (u_ref, v_ref, s_ref) in zip(WEIGHTS, us, vs, sigmas, expected):
        assert_close_report(u, u_ref, atol=2e-5, rtol=0, name=f"{name} u")
        assert_close_report(v, v_ref, atol=2e-5, rtol=0, name=f"{name} v")
        assert_close_report(sigma, s_ref, atol=0, rtol=2e-5, name=f"{name} sigma")


@_triton_ok
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_power_iteration_single_weight_and_eps_floor(backend):
    """One weight alone; and a weight so small that eps floors |W v|: torch's F.normalize result."""
    w, u, v = _random_problem((7, 3, 3, 3), 0, torch.float64)
    u_ref, v_ref, s_ref = _reference_update(w, u, v, 0, 1)
    sigma = spectral_norm_power_iteration_([w], [u], [v], [0], backend=backend)
    assert_close_report(u, u_ref, atol=1e-12, rtol=0, name="u")
    assert_close_report(sigma[0], s_ref, atol=0, rtol=1e-12, name="sigma")
    tiny = w * 1e-9
    u_ref, v_ref, s_ref = _reference_update(tiny, u, v, 0, 1, eps=1e-3)
    sigma = spectral_norm_power_iteration_([tiny], [u], [v], [0], eps=1e-3, backend=backend)
    assert_close_report(u, u_ref, atol=1e-12, rtol=0, name="floored u")
    assert_close_report(v, v_ref, atol=1e-12, rtol=0, name="floored v")
    assert_close_report(sigma[0], s_ref, atol=0, rtol=1e-12, name="floored sigma")


@_triton_ok
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape,dim,name", WEIGHTS, ids=WEIGHT_IDS)
def test_normalize_forward_backward_matches_reference(shape, dim, name, dtype):
    w, u, v = _random_problem(shape, dim, torch.float64)
    mat = reference.weight_to_matrix(w, dim)
    sigma = reference.spectral_norm_sigma(mat, u, v)
    grad = torch.randn_like(w)
    w_ref = w.clone().requires_grad_()
    out_ref = spectral_norm_normalize(w_ref, u, v, sigma, dim=dim, backend="reference")
    out_ref.backward(grad)
    # the closed form in reference.py agrees with autograd through sigma
    closed = reference.spectral_norm_backward(grad, out_ref.detach(), u, v, sigma, dim)
    assert_close_report(closed, w_ref.grad, atol=1e-12, rtol=1e-12, name="closed-form dW")

    w_t = w.to(dtype).requires_grad_()
    out = spectral_norm_normalize(w_t, u.to(dtype), v.to(dtype),
                                  sigma.to(torch.promote_types(dtype, torch.float32)),
                                  dim=dim, backend="triton")
    out.backward(grad.to(dtype))
    assert out.dtype == dtype and w_t.grad.dtype == dtype
    # fp32: one division per element, and <G, W> summed over <= 1000 products in fp32.
    tol = TOL[dtype]
    assert_close_report(out, out_ref, atol=tol, rtol=tol, name=f"{name} W_sn")
    assert_close_report(w_t.grad, w_ref.grad, atol=tol, rtol=tol, name=f"{name} dW")


@_triton_ok
def test_normalize_gradcheck_float64():
    """gradcheck through sigma(W): numerical d(W / (u.W v)) against the fused closed form."""
    from sagan_fast.ops.triton import spectral_norm as tsn
    w, u, v = _random_problem((5, 2, 3), 1, torch.float64)

    def f(weight):  # sigma is recomputed from the (perturbed) weight inside the op
        return tsn.normalize(weight, u, v, 1)
    assert torch.autograd.gradcheck(f, (w.requires_grad_(),), eps=1e-6, atol=1e-8)


@_triton_ok
def test_opcheck():
    from sagan_fast.ops.triton import spectral_norm as tsn
    w, u, v = _random_problem((7, 3, 3), 0, torch.float32)
    sigma = reference.spectral_norm_sigma(reference.weight_to_matrix(w, 0), u, v)
    torch.library.opcheck(tsn._normalize_op, (w.requires_grad_(), u, v, 0))
    g = torch.randn_like(w)
    torch.library.opcheck(tsn._normalize_backward_op, (g, w.detach(), u, v, sigma, 0))
    w2, u2, v2 = _random_problem((3, 5, 2), 1, torch.float32)
    torch.library.opcheck(tsn._power_iteration_op, ([w.detach(), w2], [u, u2], [v, v2], [0, 1], 1, 1e-12),
                          test_utils=("test_schema", "test_faketensor"))


@_triton_ok
def test_bad_inputs_raise_before_launch():
    w, u, v = _random_problem((7, 3, 3), 0, torch.float32)
    with pytest.raises(ValueError, match="u must have shape"):
        spectral_norm_power_iteration_([w], [u[:-1]], [v], [0], backend="triton")
    with pytest.raises(TypeError, match="floating-point"):
        spectral_norm_power_iteration_([w.long()], [u], [v], [0], backend="triton")
    with pytest.raises(IndexError, match="dim 3 out of range"):
        spectral_norm_normalize(w, u, v, torch.tensor(1.0), dim=3, backend="triton")
    with pytest.raises(ValueError, match="contiguous"):
        u2 = torch.randn(14)[::2]
        spectral_norm_power_iteration_([w], [u2], [v], [0], backend="triton")
    with pytest.raises(ValueError, match=r"unknown backend 'tritn' \(from backend=\); expected one of"):
        spectral_norm_power_iteration_([w], [u], [v], [0], backend="tritn")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(BackendUnavailableError):
            spectral_norm_power_iteration_([w], [u], [v], [0], backend="triton")


@_triton_ok
@pytest.mark.parametrize("dtype,capturing", [(torch.float64, False), (torch.float32, False),
                                             (torch.float32, True)], ids=str)
def test_normalize_multi_matches_reference(dtype, capturing, monkeypatch):
    """All weights in one launch, backward in two; one output gets no gradient (its weight none).
    ``capturing``: the backward as inside a CUDA graph capture (per-weight kernels, no table)."""
    from sagan_fast.ops.spectral_norm import spectral_norm_normalize_multi
    from sagan_fast.ops.triton import spectral_norm as tsn
    monkeypatch.setattr(tsn, "_BLOCK_MULTI", 256)  # several programs per weight at these sizes
    monkeypatch.setattr(tsn, "_BLOCK_EW", 128)     # and several partial sums per weight
    monkeypatch.setattr(tsn, "_PLANS", {})
    problems = [_random_problem(s, d, torch.float64) for s, d, _ in WEIGHTS]
    dims = [d for _, d, _ in WEIGHTS]
    grads = [torch.randn_like(w) for w, _, _ in problems]
    ws = [w.detach().clone().to(dtype).requires_grad_() for w, _, _ in problems]
    outs = spectral_norm_normalize_multi(ws, [u.to(dtype) for _, u, v in problems],
                                         [v.to(dtype) for _, u, v in problems], dims, backend="triton")
    skip = 2  # no gradient flows to this output
    if capturing:
        monkeypatch.setattr(tsn, "_capturing", lambda device: True)
        monkeypatch.setattr(tsn, "_dot_partials_multi_kernel", None)  # must not be used
    torch.autograd.backward([o for i, o in enumerate(outs) if i != skip],
                            [g.to(dtype) for i, g in enumerate(grads) if i != skip])
    tol = TOL[dtype]
    for i, ((w, u, v), d, (_, _, name)) in enumerate(zip(problems, dims, WEIGHTS)):
        w_ref = w.clone().requires_grad_()
        out_ref = spectral_norm_normalize(w_ref, u, v, None, dim=d, backend="reference")
        out_ref.backward(grads[i])
        assert_close_report(outs[i], out_ref, atol=tol, rtol=tol, name=f"{name} W_sn")
        if i == skip:
            assert ws[i].grad is None
        else:
            assert_close_report(ws[i].grad, w_ref.grad, atol=tol, rtol=tol, name=f"{name} dW")


@_triton_ok
def test_no_new_tables_while_capturing(monkeypatch):
    from sagan_fast.ops.triton import spectral_norm as tsn
    monkeypatch.setattr(tsn, "_PLANS", {})
    monkeypatch.setattr(tsn, "_capturing", lambda device: True)
    w, u, v = _random_problem((5, 7), 0, torch.float32)
    with pytest.raises(RuntimeError, match="run the same step once eagerly before capturing"):
        tsn.power_iteration_([w], [u], [v], [0], 1, 1e-12)
    # a plan built before the capture and used during it outlives any cache eviction
    monkeypatch.setattr(tsn, "_CAPTURED_PLANS", [])
    monkeypatch.setattr(tsn, "_capturing", lambda device: False)
    tsn.power_iteration_([w], [u], [v], [0], 1, 1e-12)
    monkeypatch.setattr(tsn, "_capturing", lambda device: True)
    tsn.power_iteration_([w], [u], [v], [0], 1, 1e-12)
    assert len(tsn._CAPTURED_PLANS) == 1


@_triton_ok
def test_normalize_multi_detects_in_place_change_of_u():
    from sagan_fast.ops.triton import spectral_norm as tsn
    w, u, v = _random_problem((5, 7), 0, torch.float32)
    (out,) = tsn.normalize_multi([w.requires_grad_()], [u], [v], [0])
    u.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@_triton_ok
def test_fused_model_normalizes_all_layers_at_once(monkeypatch):
    """Inside the model's forward the layers use the model-level W_sn (one call); a layer called
    on its own afterwards normalizes its own weight; results equal the per-layer path."""
    import sagan_fast.ops.spectral_norm as ops_sn
    torch.manual_seed(9)
    g, d = _tiny_gan("triton")
    torch.manual_seed(9)
    g2, d2 = _tiny_gan("triton")
    fuse_spectral_norms(d2, normalize_all=False)
    multi_calls, single_calls = [], []
    multi, single = sn_mod.spectral_norm_normalize_multi, sn_mod.spectral_norm_normalize
    monkeypatch.setattr(sn_mod, "spectral_norm_normalize_multi",
                        lambda *a, **k: multi_calls.append(len(a[0])) or multi(*a, **k))
    monkeypatch.setattr(sn_mod, "spectral_norm_normalize",
                        lambda *a, **k: single_calls.append(1) or single(*a, **k))
    x = torch.randn(3, 3, 4, 4)
    out, out2 = d(x), d2(x)
    assert multi_calls == [2] and len(single_calls) == 2, (multi_calls, single_calls)  # d2: per layer
    out.sum().backward()
    out2.sum().backward()
    assert_close_report(out, out2, atol=1e-6, rtol=1e-6, name="D output")
    for p, p2 in zip(d.parameters(), d2.parameters()):
        assert_close_report(p.grad, p2.grad, atol=1e-6, rtol=1e-5, name="D grad")
    assert all(sn._w_sn_stash is None for sn, _ in spectral_norm_layers(d))
    d[0](x)  # alone, outside the model's forward
    assert len(single_calls) == 3 and multi_calls == [2]
    assert ops_sn.spectral_norm_normalize_multi is multi


# ------------------------------------------------------------------------------------------------
# The drop-in module vs torch's parametrization
# ------------------------------------------------------------------------------------------------

def _layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    if kind == "conv":
        return nn.Conv2d(3, 7, 3), torch.randn(2, 3, 7, 7)
    if kind == "conv_transpose":
        return nn.ConvTranspose2d(5, 3, 3), torch.randn(2, 5, 5, 5)
    if kind == "linear_to_1":
        return nn.Linear(37, 1), torch.randn(3, 37)
    if kind == "embedding":
        return nn.Embedding(11, 9), torch.tensor([[1, 4, 10], [3, 3, 0]])
    raise ValueError(kind)


LAYER_KINDS = ["conv", "conv_transpose", "linear_to_1", "embedding"]


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=_triton_ok)])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_several_steps_match_torch_parametrization(kind, backend):
    torch.manual_seed(1)
    ours, x = _layer(kind)
    theirs = _layer(kind)[0]
    theirs.load_state_dict(ours.state_dict())
    torch.manual_seed(2)
    spectral_norm(ours, backend=backend)
    torch.manual_seed(2)
    nn.utils.parametrizations.spectral_norm(theirs)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (ours, theirs)]
    for step in range(3):
        # Compared after both forwards: torch iterates in its forward, ours ran the same iteration
        # on the same weight right after the previous optimizer step (or at its first forward).
        outs = [m(x) for m in (ours, theirs)]
        pw_o, pw_t = ours.parametrizations.weight, theirs.parametrizations.weight
        for out, opt in zip(outs, opts):
            out.square().mean().backward()
        outs = [o.detach() for o in outs]
        if backend == "reference":
            # same ops in the same order: bitwise equal
            assert torch.equal(outs[0], outs[1]), f"step {step}: outputs differ"
            assert torch.equal(pw_o.original, pw_t.original), f"step {step}: weights differ"
            assert torch.equal(pw_o[0]._u, pw_t[0]._u) and torch.equal(pw_o[0]._v, pw_t[0]._v)
        else:
            # fp32 kernels vs torch's fp32 ops: reductions in another order; Adam's lr 1e-2 steps
            # amplify differences little over 3 steps.
            assert_close_report(outs[0], outs[1], atol=1e-5, rtol=1e-4, name=f"step {step} output")
            assert_close_report(pw_o.original, pw_t.original, atol=1e-5, rtol=1e-4, name="weight")
            assert_close_report(pw_o[0]._u, pw_t[0]._u, atol=1e-5, rtol=0, name="u")
            assert_close_report(pw_o[0]._v, pw_t[0]._v, atol=1e-5, rtol=0, name="v")
        for opt in opts:
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dicts_interchangeable_with_torch(direction):
    torch.manual_seed(3)
    a, x = _layer("conv")
    b = _layer("conv")[0]
    if direction == "torch_to_ours":
        nn.utils.parametrizations.spectral_norm(a)
        spectral_norm(b, backend="reference")
    else:
        spectral_norm(a, backend="reference")
        nn.utils.parametrizations.spectral_norm(b)
    a(x)  # one training forward: u, v move away from their initial values
    sd = a.state_dict()
    assert set(sd) == set(b.state_dict())
    b.load_state_dict(sd)
    a.eval()
    b.eval()
    assert_close_report(b(x), a(x), atol=1e-6, rtol=1e-6, name="eval output after load")
    assert_close_report(b.weight, a.weight, atol=1e-7, rtol=1e-6, name="normalized weight")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=_triton_ok)])
def test_eval_mode_uses_stored_u_v(backend):
    m, x = _layer("conv")
    spectral_norm(m, backend=backend)
    m(x)
    m.eval()
    pw = m.parametrizations.weight
    u, v = pw[0]._u.clone(), pw[0]._v.clone()
    with torch.no_grad():
        pw.original.mul_(1.5)  # a weight change in eval must not trigger an update
    w_sn = m.weight
    m(x)
    assert torch.equal(pw[0]._u, u) and torch.equal(pw[0]._v, v)
    sigma = reference.spectral_norm_sigma(reference.weight_to_matrix(pw.original.detach()), u, v)
    assert_close_report(w_sn, pw.original / sigma, atol=1e-6, rtol=1e-6, name="eval W_sn")


def _tiny_gan(backend):
    g = nn.Sequential(nn.Linear(8, 6 * 4 * 4), nn.Unflatten(1, (6, 4, 4)), nn.ReLU(),
                      nn.ConvTranspose2d(6, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 3, 3, padding=1))
    d = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 2 * 2, 1))
    for model in (g, d):
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                spectral_norm(m, backend=backend)
        fuse_spectral_norms(model)
    return g, d


def _gan_steps(g, d, steps, d_step, g_step):
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-3, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(d.parameters(), lr=4e-3, betas=(0.0, 0.9))
    gen = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(steps):
        real = torch.randn(4, 3, 4, 4, generator=gen)
        z = torch.randn(4, 8, generator=gen)
        loss_d = d_step(real, z)
        opt_d.step()
        opt_d.zero_grad()
        loss_g = g_step(z)
        opt_g.step()
        opt_g.zero_grad()
        d.zero_grad()
        losses.append((loss_d.item(), loss_g.item()))
    return losses


def _make_steps(g, d):
    def d_step(real, z):
        with torch.no_grad():  # G under no_grad ...
            fake = g(z)
        # ... D on real then fake before one backward
        loss = F.relu(1 - d(real)).mean() + F.relu(1 + d(fake)).mean()
        loss.backward()
        return loss.detach()

    def g_step(z):  # ... then G with grad
        loss = -d(g(z)).mean()
        loss.backward()
        return loss.detach()
    return d_step, g_step


@_triton_ok
def test_gan_step_triton_matches_reference():
    """Two full GAN steps (G under no_grad then with grad, D on real then fake before one
    backward): triton backend == reference backend within fp32 tolerance."""
    torch.manual_seed(6)
    g, d = _tiny_gan("triton")
    losses = _gan_steps(g, d, 2, *_make_steps(g, d))
    torch.manual_seed(6)
    g2, d2 = _tiny_gan("reference")
    losses_ref = _gan_steps(g2, d2, 2, *_make_steps(g2, d2))
    tol = 1e-5  # fp32 kernels vs fp32 torch ops, two Adam steps
    for (ld, lg), (ld2, lg2) in zip(losses, losses_ref):
        assert abs(ld - ld2) <= tol * (1 + abs(ld2)) and abs(lg - lg2) <= tol * (1 + abs(lg2))
    for p, p2 in zip(list(g.parameters()) + list(d.parameters()),
                     list(g2.parameters()) + list(d2.parameters())):
        assert_close_report(p, p2, atol=tol, rtol=tol, name="parameter after 2 steps")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=_triton_ok)])
def test_gan_step_under_torch_compile(backend):
    """The whole D step and G step compiled (aot_eager: inductor is too slow on this CPU)."""
    torch._dynamo.reset()
    torch.manual_seed(7)
    g, d = _tiny_gan(backend)
    d_step, g_step = _make_steps(g, d)
    losses = _gan_steps(g, d, 2, torch.compile(d_step, backend="aot_eager"),
                        torch.compile(g_step, backend="aot_eager"))
    torch.manual_seed(7)
    g2, d2 = _tiny_gan(backend)
    losses_eager = _gan_steps(g2, d2, 2, *_make_steps(g2, d2))
    for (ld, lg), (ld2, lg2) in zip(losses, losses_eager):
        assert abs(ld - ld2) <= 1e-5 * (1 + abs(ld2)) and abs(lg - lg2) <= 1e-5 * (1 + abs(lg2))
    for (sn, w), (sn2, w2) in zip(spectral_norm_layers(d), spectral_norm_layers(d2)):
        assert_close_report(sn._u, sn2._u, atol=1e-5, rtol=0, name="D u after compiled steps")
    torch._dynamo.reset()


@_triton_ok
def test_channels_last_weights_match_contiguous():
    """A channels_last conv weight is read through a contiguous copy: same u, v, W_sn and dW."""
    torch.manual_seed(10)
    g, d = _tiny_gan("triton")
    torch.manual_seed(10)
    g2, d2 = _tiny_gan("triton")
    d2.to(memory_format=torch.channels_last)
    assert not d2[0].parametrizations.weight.original.is_contiguous()
    x = torch.randn(2, 3, 4, 4)
    out, out2 = d(x), d2(x)
    out.sum().backward()
    out2.sum().backward()
    assert_close_report(out2, out, atol=1e-6, rtol=1e-6, name="D output")
    for (sn, w), (sn2, w2) in zip(spectral_norm_layers(d), spectral_norm_layers(d2)):
        assert_close_report(sn2._u, sn._u, atol=1e-6, rtol=0, name="u")
        assert_close_report(w2.grad, w.grad, atol=1e-6, rtol=1e-5, name="dW")


def test_update_once_per_weight_version_and_fused_hook(monkeypatch):
    torch.manual_seed(8)
    g, d = _tiny_gan("reference")
    calls = []
    original = sn_mod.power_iteration_checked_

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return original(*args, **kwargs)
    monkeypatch.setattr(sn_mod, "power_iteration_checked_", counting)
    x = torch.randn(2, 3, 4, 4)
    d(x)
    d(x)  # same weights: no second update
    assert calls == [2], calls  # both SN weights of D in one multi-tensor call
    with torch.no_grad():
        d[0].parametrizations.weight.original.add_(0.01)
    d(x)
    assert calls == [2, 1], calls  # only the changed weight is stale again


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=_triton_ok)])
@pytest.mark.parametrize("bad", ["zero", "nan", "inf"])
def test_degenerate_weights_raise_clear_error(bad, backend):
    m, x = _layer("conv")
    spectral_norm(m, backend=backend)
    with torch.no_grad():
        w = m.parametrizations.weight.original
        if bad == "zero":
            w.zero_()
        else:
            w[0, 0, 0, 0] = float(bad)
    with pytest.raises(SpectralNormError, match=r"sigma is zero, NaN or Inf.*\(7, 3, 3, 3\)"):
        m(x)


def test_check_finite_switch_defers_the_check():
    m, x = _layer("conv")
    spectral_norm(m, backend="reference")
    previous = set_check_finite(False)
    try:
        with torch.no_grad():
            m.parametrizations.weight.original.zero_()
        m(x)  # no sync, no error
        assert update_spectral_norms(m, force=True) == 1
        with pytest.raises(SpectralNormError):
            check_spectral_norms(m)  # the log-step check
        with pytest.raises(SpectralNormError):
            update_spectral_norms(m, force=True, check_finite=True)
    finally:
        set_check_finite(previous)
    assert sn_mod.check_finite_enabled() is previous


def test_sigma_op_and_one_dimensional_weight():
    w, u, v = _random_problem((5, 4), 0, torch.float32)
    s = spectral_norm_sigma(w, u, v)
    assert s.dtype == torch.float32
    assert_close_report(s, u.double() @ (w.double() @ v.double()), atol=0, rtol=1e-6, name="sigma")
    m = nn.Module()
    m.weight = nn.Parameter(torch.randn(9))
    spectral_norm(m, backend="reference")
    assert_close_report(m.weight, F.normalize(m.parametrizations.weight.original.detach(), dim=0),
                        atol=0, rtol=0, name="1-D weight")


# ------------------------------------------------------------------------------------------------
# Kernel plumbing (issue 13): output dtype, alignment fallback, launch tables, capture, launches
# ------------------------------------------------------------------------------------------------

# W_sn in a 16-bit dtype is W / sigma computed in fp32 (~1e-6 relative) and rounded once: to
# nearest on a GPU (half an ulp), by truncation in the Triton interpreter (under one ulp). One ulp
# relative bounds both: 2^-7 of the value for bf16 (8 significant bits), 2^-10 for fp16 (11). An
# fp32 W_sn cast by autocast is within half an ulp of the same value, so on a GPU the two agree to
# one ulp. dW stays fp32 from the given 16-bit G: the fp32 tolerance of TOL.
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}

# More shapes: rows of whole 16-byte vectors (C = 40, 64: the aligned tiled branch) and SAGAN's
# 3-channel input conv (C = 27: tiled, unaligned rows).
ALIGN_WEIGHTS = WEIGHTS + [((24, 40), 0, "rows_of_40"), ((40, 64), 0, "rows_of_64"),
                           ((16, 3, 3, 3), 0, "rgb_conv")]


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` one element past an aligned address."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def _fp64_normalize(w, u, v, dim, grad):
    """float64 W / (u . W v) and its gradient for ``grad`` (u, v constant)."""
    w64 = w.detach().double().clone().requires_grad_()
    out = w64 / reference.spectral_norm_sigma(reference.weight_to_matrix(w64, dim), u.double(), v.double())
    out.backward(grad.double())
    return out.detach(), w64.grad


@_triton_ok
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("path", ["per_layer", "multi"])
def test_normalize_writes_the_output_dtype_and_grads_the_fp32_weight(path, out_dtype, monkeypatch):
    """fp32 weights, W_sn in bf16 / fp16 (what autocast wants), G in that dtype: W_sn within one
    ulp of the float64 W / sigma, dW in fp32 within fp32 rounding of the float64 gradient."""
    from sagan_fast.ops.spectral_norm import spectral_norm_normalize_multi
    from sagan_fast.ops.triton import spectral_norm as tsn
    monkeypatch.setattr(tsn, "_PLANS", {})
    problems = [_random_problem(s, d, torch.float32) for s, d, _ in ALIGN_WEIGHTS]
    dims = [d for _, d, _ in ALIGN_WEIGHTS]
    ws = [w.clone().requires_grad_() for w, _, _ in problems]
    us, vs = [u for _, u, _ in problems], [v for _, _, v in problems]
    if path == "multi":
        outs = spectral_norm_normalize_multi(ws, us, vs, dims, backend="triton",
                                             out_dtypes=[out_dtype] * len(ws))
    else:
        outs = [spectral_norm_normalize(w, u, v, dim=d, backend="triton", out_dtype=out_dtype)
                for w, u, v, d in zip(ws, us, vs, dims)]
    grads = [torch.randn(w.shape, dtype=torch.float64).to(out_dtype) for w in ws]
    torch.autograd.backward(outs, grads)
    for w, u, v, d, out, g, (_, _, name) in zip(ws, us, vs, dims, outs, grads, ALIGN_WEIGHTS):
        assert out.dtype == out_dtype and w.grad.dtype == torch.float32, (name, out.dtype, w.grad.dtype)
        ref, ref_grad = _fp64_normalize(w, u, v, d, g)
        assert_close_report(out, ref, atol=0, rtol=ULP[out_dtype] + 2e-6, name=f"{name} W_sn")
        assert_close_report(w.grad, ref_grad, atol=TOL[torch.float32], rtol=TOL[torch.float32],
                            name=f"{name} dW")


@_triton_ok
def test_unaligned_storage_takes_the_fallback_branch_with_the_same_result(monkeypatch):
    """A weight (or u) 4 bytes past an aligned address runs the unhinted branch of every kernel:
    the same sums in the same order, so u, v, sigma, W_sn and dW are bitwise the aligned copy's.
    The plans record which branch each weight takes."""
    from sagan_fast.ops.triton import spectral_norm as tsn
    monkeypatch.setattr(tsn, "_PLANS", {})
    monkeypatch.setattr(tsn, "_BLOCK_MULTI", 256)
    monkeypatch.setattr(tsn, "_BLOCK_EW", 128)
    w, u, v = _random_problem((40, 64), 0, torch.float32)
    results, plans = [], []
    for weight, uu in ((w.clone(), u.clone()), (_misaligned(w), u.clone()), (w.clone(), _misaligned(u))):
        vv = v.clone()
        sigma = tsn.power_iteration_([weight], [uu], [vv], [0], 2, 1e-12)
        plans.append(next(p for k, p in tsn._PLANS.items() if k[0] == "power_iteration"
                          and k[2][0] == weight.data_ptr() and k[2][2] == uu.data_ptr()))
        wg = weight.detach().requires_grad_()
        (out,) = tsn.normalize_multi([wg], [uu], [vv], [0])
        out.backward(torch.ones_like(out))
        plans.append(next(p for k, p in tsn._PLANS.items() if k[0] == "normalize"
                          and k[2][0] == weight.data_ptr() and k[2][2] == uu.data_ptr()))
        results.append((uu, vv, sigma, out.detach(), wg.grad))
    assert [p.paths for p in plans[::2]] == [[2], [1], [1]]  # dim 0 aligned; dim 0 not aligned
    assert [(p.tiled, p.hints) for p in plans[1::2]] == [([True], [3]), ([True], [0]), ([True], [1])]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@_triton_ok
def test_alignment_flags_of_every_layout(monkeypatch):
    """What each test shape gets: dim-0 weights tiled (rows of >= 32 or small), aligned when their
    rows are whole vectors; other dims flat, aligned when their size is; the group compiles the
    general-dim / flat paths only when such a weight is in it."""
    from sagan_fast.ops.triton import spectral_norm as tsn
    monkeypatch.setattr(tsn, "_PLANS", {})
    problems = [_random_problem(s, d, torch.float32) for s, d, _ in ALIGN_WEIGHTS]
    ws, us, vs = (list(x) for x in zip(*problems))
    dims = [d for _, d, _ in ALIGN_WEIGHTS]
    tsn.normalize_multi(ws, us, vs, dims)
    tsn.power_iteration_(ws, us, vs, dims, 1, 1e-12)
    plans = {k[0]: p for k, p in tsn._PLANS.items()}
    names = [n for _, _, n in ALIGN_WEIGHTS]
    tiled = dict(zip(names, plans["normalize"].tiled))
    hints = dict(zip(names, plans["normalize"].hints))
    paths = dict(zip(names, plans["power_iteration"].paths))
    assert tiled == dict(conv=True, conv_transpose=False, linear_to_1=True, linear=True, embedding=True,
                         dim2=False, rows_of_40=True, rows_of_64=True, rgb_conv=True)
    assert {n for n, h in hints.items() if h & 2} == {"linear_to_1", "rows_of_40", "rows_of_64"}
    assert {n for n, h in hints.items() if h & 1} == {"linear_to_1", "dim2", "rows_of_40", "rows_of_64",
                                                      "rgb_conv"}
    assert {n for n, p in paths.items() if p == 0} == {"conv_transpose", "dim2"}
    assert {n for n, p in paths.items() if p == 2} == {"linear_to_1", "rows_of_40", "rows_of_64"}
    assert plans["normalize"].flat and plans["power_iteration"].general
    dim0 = [i for i, d in enumerate(dims) if d == 0]
    tsn.normalize_multi([ws[i] for i in dim0], [us[i] for i in dim0], [vs[i] for i in dim0], [0] * len(dim0))
    assert not tsn._PLANS[next(k for k in tsn._PLANS if k[0] == "normalize" and len(k) == 2 + len(dim0))].flat


@_triton_ok
def test_launch_tables_built_once_and_rebuilt_only_for_new_storage(monkeypatch):
    """The forward's tables are built once per (weights, u, v) and kept; the backward's gradient
    table is cached on the gradients' addresses; an in-place write keeps the plan (same
    addresses, same contents), new storage (``.data = ...``) gets a new one: every result equals
    the float64 reference of the values at that time."""
    from sagan_fast.ops.triton import spectral_norm as tsn
    monkeypatch.setattr(tsn, "_PLANS", {})
    problems = [_random_problem(s, d, torch.float32) for s, d, _ in WEIGHTS[:3]]
    dims = [d for _, d, _ in WEIGHTS[:3]]
    ws = [nn.Parameter(w.clone()) for w, _, _ in problems]
    us, vs = [u for _, u, _ in problems], [v for _, _, v in problems]
    grads = [torch.randn_like(w) for w in ws]

    def check(outs):
        for w, u, v, d, out, g in zip(ws, us, vs, dims, outs, grads):
            ref, ref_grad = _fp64_normalize(w, u, v, d, g)
            assert_close_report(out, ref, atol=TOL[torch.float32], rtol=TOL[torch.float32], name="W_sn")

    start = tsn._UPLOADS
    outs = tsn.normalize_multi(ws, us, vs, dims)
    assert tsn._UPLOADS - start == 5  # pointers, sizes, three work lists
    torch.autograd.backward(outs, grads, retain_graph=True)
    assert tsn._UPLOADS - start == 6  # + the gradients' addresses
    torch.autograd.backward(outs, grads)
    assert tsn._UPLOADS - start == 6  # the same gradients: the cached table
    check(tsn.normalize_multi(ws, us, vs, dims))
    with torch.no_grad():
        ws[0].add_(torch.randn_like(ws[0]))  # in place: same storage, same plan, new values
    check(tsn.normalize_multi(ws, us, vs, dims))
    assert tsn._UPLOADS - start == 6
    ws[1].data = ws[1].data.clone() * 2 + 1  # new storage: a new plan
    check(tsn.normalize_multi(ws, us, vs, dims))
    assert tsn._UPLOADS - start == 11


@_triton_ok
@pytest.mark.parametrize("change", ["load_state_dict_assign", "to_float64"])
def test_fused_model_follows_new_weight_storage(change):
    """Model-level: the fused normalize after load_state_dict(assign=True) (new storage, new
    values) or .to(float64) gives what the reference backend gives for the same state."""
    torch.manual_seed(11)
    _, d = _tiny_gan("triton")
    _, d_ref = _tiny_gan("reference")
    x = torch.randn(3, 3, 4, 4)
    d(x).sum().backward()  # plans for the first storage
    state = {k: (v + 0.1 * torch.randn_like(v)) if k.endswith("original") else v.clone()
             for k, v in d.state_dict().items()}
    if change == "load_state_dict_assign":
        d.load_state_dict(state, assign=True)
    else:
        d.load_state_dict(state)
        d.to(torch.float64)
        d_ref.to(torch.float64)
        x = x.double()
    d_ref.load_state_dict(d.state_dict())
    d.zero_grad()
    out, out_ref = d(x), d_ref(x)
    out.sum().backward()
    out_ref.sum().backward()
    tol = 1e-5 if change == "load_state_dict_assign" else 1e-12
    assert_close_report(out, out_ref, atol=tol, rtol=tol, name="D output")
    for (sn, w), (_, w_ref) in zip(spectral_norm_layers(d), spectral_norm_layers(d_ref)):
        assert_close_report(w.grad, w_ref.grad, atol=tol, rtol=tol, name="dW")


@_triton_ok
def test_no_host_data_reaches_the_device_while_capturing_mixed_dtypes(monkeypatch):
    """A CUDA-graph capture (simulated: the capture check patched) of a mixed-dtype step - fp32 and
    fp64 weights in one call, power iteration, model-level normalize and its backward - once the
    plans exist from an eager run: no tensor is built from host data (aten.lift_fresh), nothing
    syncs (aten._local_scalar_dense), no table is uploaded; gradients at addresses no cached
    table holds take the per-weight kernels. Results equal the eager run's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sagan_fast.ops.triton import spectral_norm as tsn
    monkeypatch.setattr(tsn, "_PLANS", {})
    monkeypatch.setattr(tsn, "_CAPTURED_PLANS", [])

    class NoHostData(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.lift_fresh.default, torch.ops.aten._local_scalar_dense.default):
                raise AssertionError(f"{func} while capturing")
            return func(*args, **(kwargs or {}))

    with pytest.raises(AssertionError, match="lift_fresh"), NoHostData():
        torch.tensor([1, 2])  # the check sees a host-data tensor (and would see an index list)
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64]
    problems = [_random_problem(s, d, dt) for (s, d, _), dt in zip(WEIGHTS, dtypes)]
    dims = [d for _, d, _ in WEIGHTS[:4]]
    grads_seen, grads_new = ([torch.randn(w.shape, dtype=w.dtype) for w, _, _ in problems] for _ in range(2))

    # One set of parameters and buffers, as a captured training step has (fixed addresses).
    ws = [w.clone().requires_grad_() for w, _, _ in problems]
    us, vs = [u.clone() for _, u, _ in problems], [v.clone() for _, _, v in problems]

    def step(grads):
        for w, x, (_, u0, v0) in zip(ws, us, problems):
            w.grad = None
            x.copy_(u0)
        for x, (_, _, v0) in zip(vs, problems):
            x.copy_(v0)
        # the op's implementation (a dispatch mode does not see inside a custom op it dispatches)
        sigmas = tsn._power_iteration_impl([w.detach() for w in ws], us, vs, dims, 1, 1e-12)
        outs = tsn.normalize_multi(ws, us, vs, dims)
        torch.autograd.backward(outs, grads)
        return [t.clone() for t in (sigmas, *us, *vs, *[o.detach() for o in outs], *[w.grad for w in ws])]

    eager_seen = step(grads_seen)  # plans and the gradient table of grads_seen
    per_weight = []
    impl = tsn._normalize_backward_impl
    monkeypatch.setattr(tsn, "_normalize_backward_impl", lambda *a: per_weight.append(1) or impl(*a))
    uploads = tsn._UPLOADS
    monkeypatch.setattr(tsn, "_capturing", lambda device: True)
    with NoHostData():
        captured_seen = step(grads_seen)  # the cached gradient table: the multi-tensor backward
        assert not per_weight
        captured_new = step(grads_new)  # gradients at new addresses: per-weight kernels
    assert len(per_weight) == len(problems)
    assert tsn._UPLOADS == uploads
    assert tsn._CAPTURED_PLANS, "plans used during a capture are kept alive"
    monkeypatch.setattr(tsn, "_capturing", lambda device: False)
    eager_new = step(grads_new)
    for a, b in zip(eager_seen, captured_seen):
        assert torch.equal(a, b)
    for a, b in zip(eager_new, captured_new):  # another backward kernel: fp32 / fp64 rounding apart
        tol = TOL[a.dtype]
        assert_close_report(b, a, atol=tol, rtol=tol, name="captured vs eager")


def test_cuda_backend_mixed_dtypes_build_nothing_from_host_data():
    """The cuda backend's mixed-dtype power iteration puts sigmas back in order on the device."""
    from torch.utils._python_dispatch import TorchDispatchMode
    if _cuda_reason is not None:
        pytest.skip(_cuda_reason)
    from sagan_fast.ops import cuda as cuda_backend

    class NoHostData(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.lift_fresh.default:
                raise AssertionError("a tensor from host data")
            return func(*args, **(kwargs or {}))

    dtypes = [torch.float64, torch.float32, torch.float64]
    problems = [_random_problem(s, d, dt) for (s, d, _), dt in zip(WEIGHTS, dtypes)]
    ws, us, vs = (list(x) for x in zip(*problems))
    dims = [d for _, d, _ in WEIGHTS[:3]]
    expected = [_reference_update(w, u, v, d, 1)[2] for w, u, v, d in zip(ws, us, vs, dims)]
    with NoHostData():
        sigmas = cuda_backend.power_iteration_(ws, us, vs, dims, 1, 1e-12)
    assert sigmas.dtype == torch.float64
    for s, e in zip(sigmas, expected):
        assert_close_report(s, e, atol=0, rtol=2e-5, name="sigma")


def _count_launches(monkeypatch) -> list[str]:
    """Names of the Triton kernels launched from now on (interpreter)."""
    from triton.runtime.interpreter import InterpretedFunction
    calls: list[str] = []
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        calls.append(self.__name__)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", run)
    return calls


@_triton_ok
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts launches in the interpreter")
def test_launch_counts_of_a_fused_and_an_unfused_model(monkeypatch):
    """Fused model: first training forward = power iteration (3 launches) + normalize (2), the
    next forward 2, its backward 2, whatever the number of layers; unfused: 2 per layer each way."""
    torch.manual_seed(12)
    g, _ = _tiny_gan("triton")  # 3 SN layers
    calls = _count_launches(monkeypatch)
    z = torch.randn(2, 8)
    g(z)
    assert calls == ["_matvec_kernel", "_rmatvec_kernel", "_finalize_kernel", "_uwv_partials_multi_kernel",
                     "_scale_multi_kernel"], calls
    calls.clear()
    g(z).sum().backward()
    assert calls == ["_uwv_partials_multi_kernel", "_scale_multi_kernel", "_dot_partials_multi_kernel",
                     "_normalize_backward_multi_kernel"], calls
    calls.clear()
    fuse_spectral_norms(g, normalize_all=False)
    g(z).sum().backward()
    assert sorted(calls) == sorted(["_uwv_partials_kernel", "_scale_kernel", "_dot_partials_kernel",
                                    "_normalize_backward_kernel"] * 3), calls


# --- autocast: W_sn in the autocast dtype, not cast again, every path agreeing with float64 -------

class _SNLayers(nn.Module):
    """A conv, a linear and an embedding with SN; forward: every normalized weight (as a model's
    forward reads them)."""

    def __init__(self, backend):
        super().__init__()
        self.conv = SNConv2d(3, 8, 3, padding=1, backend=backend)
        self.linear = SNLinear(24, 10, backend=backend)
        self.embedding = SNEmbedding(7, 12, backend=backend)

    def forward(self):
        return [self.conv.weight, self.linear.weight, self.embedding.weight]


AMP_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("amp_dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_gets_w_sn_in_its_dtype_and_casts_nothing_again(backend, amp_dtype):
    """Under autocast a conv's and a linear's W_sn come in the autocast dtype (an embedding's stays
    fp32: embedding is no autocast op), so F.conv2d / F.linear cast no weight; the triton backend
    writes it directly (no cast of a weight-shaped tensor at all), the others cast once."""
    from torch.utils._python_dispatch import TorchDispatchMode
    torch.manual_seed(13)
    layers = _SNLayers(backend).train()
    x, z, y = torch.randn(2, 3, 5, 5), torch.randn(4, 24), torch.tensor([1, 5])
    weight_shapes = {(8, 3, 3, 3), (10, 24)}

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) in weight_shapes:
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    layers.conv(x), layers.linear(z)  # the first forward's power iteration, outside the count
    with torch.autocast("cpu", dtype=amp_dtype):
        w_sns = layers()
        assert [w.dtype for w in w_sns] == [amp_dtype, amp_dtype, torch.float32]
        with Casts() as casts:
            outs = layers.conv(x), layers.linear(z), layers.embedding(y)
    assert [o.dtype for o in outs] == [amp_dtype, amp_dtype, torch.float32]
    assert casts.shapes == ([] if backend == "triton" else [(8, 3, 3, 3), (10, 24)]), casts.shapes
    with torch.no_grad():
        assert layers.conv.weight.dtype == torch.float32  # outside autocast nothing changes


@pytest.mark.parametrize("amp_dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("path", ["fused", "per_layer", "compiled", "reference"])
def test_autocast_paths_agree_with_float64(path, amp_dtype):
    """Under autocast, the model-level normalize (fuse_spectral_norms), the per-layer path, the
    compiled path (aot_eager) and the reference backend all give W_sn within one ulp of the
    float64 W / sigma (ULP), and fp32 weight gradients within fp32 rounding of float64's for
    the same 16-bit output gradient."""
    if path != "reference" and _triton_reason is not None:
        pytest.skip(_triton_reason)
    torch.manual_seed(14)
    model = _SNLayers("reference" if path == "reference" else "triton").train()
    if path == "fused":
        fuse_spectral_norms(model)
    run = model
    if path == "compiled":
        torch._dynamo.reset()
        run = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=amp_dtype):
        w_sns = run()
    gen = torch.Generator().manual_seed(15)
    grads = [torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w.dtype) for w in w_sns]
    torch.autograd.backward(w_sns, grads)
    for (sn, weight), w_sn, g in zip(spectral_norm_layers(model), w_sns, grads):
        assert weight.grad.dtype == torch.float32
        ref, ref_grad = _fp64_normalize(weight, sn._u, sn._v, sn.dim, g)
        rtol = ULP[amp_dtype] + 2e-6 if w_sn.dtype == amp_dtype else TOL[torch.float32]
        assert_close_report(w_sn, ref, atol=0, rtol=rtol, name=f"{tuple(weight.shape)} W_sn")
        assert_close_report(weight.grad, ref_grad, atol=TOL[torch.float32], rtol=TOL[torch.float32],
                            name=f"{tuple(weight.shape)} dW")
    if path == "compiled":
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# Compiles for Hopper (no GPU needed): a subprocess, since the interpreter is on in this one
# ------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, "bench")
    import kernel_resources as kr
    specs = json.loads(sys.argv[1])
    configs = [("fp32", torch.float32, None), ("fp32 W, fp16 W_sn", torch.float32, torch.float16),
               ("bf16", torch.bfloat16, None), ("fp64", torch.float64, None)]
    variants = kr.spectral_norm_variants(specs=[(tuple(s), d) for s, d in specs], configs=configs,
                                         label="odd")
    rows = kr.compile_all(variants, jobs=1, cache_path=None)
    print(json.dumps([{k: r.get(k) for k in ("kernel", "dtype", "spill_bytes", "max_load_bytes", "error")}
                      for r in rows]))
""")


def test_kernels_compile_for_sm90():
    """Every specialization the odd test shapes launch (mixed dims: the general and flat paths too,
    which the SAGAN-128 report of tests/test_kernel_resources.py does not compile), in fp32, fp32
    with an fp16 W_sn, bf16 and fp64, compiled for sm_90 with the JIT's launch specialization: no
    error, no spill, and 16-byte loads in every multi-tensor kernel (its aligned branch)."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    specs = json.dumps([[list(shape), dim] for shape, dim, _ in WEIGHTS])
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, specs], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in rows} >= {"_matvec_kernel", "_rmatvec_kernel", "_finalize_kernel",
                                           "_uwv_partials_multi_kernel", "_scale_multi_kernel",
                                           "_dot_partials_multi_kernel", "_normalize_backward_multi_kernel",
                                           "_uwv_partials_kernel", "_scale_kernel", "_dot_partials_kernel",
                                           "_normalize_backward_kernel"}
    assert not [r for r in rows if r["error"]], [r for r in rows if r["error"]]
    assert not [r for r in rows if r["spill_bytes"]], [r for r in rows if r["spill_bytes"]]
    per_layer = ("_uwv_partials_kernel", "_scale_kernel", "_dot_partials_kernel",
                 "_normalize_backward_kernel")
    narrow = [r for r in rows if r["kernel"] not in per_layer and r["max_load_bytes"] < 16]
    assert not narrow, narrow


# ------------------------------------------------------------------------------------------------
# Real GPU: SAGAN-128 sizes, fp32 and bf16 weights
# ------------------------------------------------------------------------------------------------

def _sagan128_weight_shapes(ch=64):
    """Representative SN weights of a SAGAN-128 G+D (ch 64): biggest and most extreme shapes."""
    return [((16 * ch * 16, 128), 0), ((16 * ch, 16 * ch, 3, 3), 0), ((8 * ch, 16 * ch, 3, 3), 0),
            ((ch, 2 * ch, 1, 1), 0), ((3, ch, 3, 3), 0), ((1, 16 * ch), 0), ((1000, 16 * ch), 0),
            ((16 * ch, 8 * ch, 4, 4), 1)]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_sagan128_sizes(dtype):
    shapes = _sagan128_weight_shapes()
    problems = [_random_problem(s, d, dtype, device="cuda") for s, d in shapes]
    ws, us, vs = (list(x) for x in zip(*problems))
    dims = [d for _, d in shapes]
    expected = [_reference_update(w, u, v, d, 1) for w, u, v, d in zip(ws, us, vs, dims)]
    sigmas = spectral_norm_power_iteration_(ws, us, vs, dims, backend="triton")
    # fp32: sums of up to 9216 products; bf16: u, v stored in bf16 (2^-8 relative rounding).
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    for (shape, _), u, v, s, (u_ref, v_ref, s_ref) in zip(shapes, us, vs, sigmas, expected):
        assert_close_report(u, u_ref, atol=tol * u_ref.abs().max().item(), rtol=tol, name=f"{shape} u")
        assert_close_report(v, v_ref, atol=tol * v_ref.abs().max().item(), rtol=tol, name=f"{shape} v")
        assert_close_report(s, s_ref, atol=0, rtol=1e-5, name=f"{shape} sigma")
    for (shape, dim), w, u, v, s in zip(shapes, ws, us, vs, sigmas):
        w64 = w.double().requires_grad_()
        ref = w64 / reference.spectral_norm_sigma(reference.weight_to_matrix(w64, dim), u.double(),
                                                  v.double())
        grad = torch.randn_like(w64)
        ref.backward(grad)
        wt = w.clone().requires_grad_()
        out = spectral_norm_normalize(wt, u, v, s, dim=dim, backend="triton")
        out.backward(grad.to(dtype))
        # bf16: outputs rounded to bf16 (2^-8) and sigma vs the bf16-rounded u, v
        rt = 1e-5 if dtype == torch.float32 else 2e-2
        assert_close_report(out, ref, atol=rt * ref.abs().max().item(), rtol=rt, name=f"{shape} W_sn")
        assert_close_report(wt.grad, w64.grad, atol=rt * w64.grad.abs().max().item(), rtol=rt,
                            name=f"{shape} dW")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_sagan128_normalize_multi(dtype):
    from sagan_fast.ops.spectral_norm import spectral_norm_normalize_multi
    shapes = _sagan128_weight_shapes()
    problems = [_random_problem(s, d, dtype, device="cuda") for s, d in shapes]
    dims = [d for _, d in shapes]
    ws = [w.clone().requires_grad_() for w, _, _ in problems]
    outs = spectral_norm_normalize_multi(ws, [u for _, u, _ in problems], [v for _, _, v in problems],
                                         dims, backend="triton")
    grads = [torch.randn_like(o, dtype=torch.float64) for o in outs]
    torch.autograd.backward(outs, [g.to(dtype) for g in grads])
    rt = 1e-5 if dtype == torch.float32 else 2e-2  # as test_gpu_sagan128_sizes
    for (shape, dim), (w, u, v), wt, out, grad in zip(shapes, problems, ws, outs, grads):
        w64 = w.double().requires_grad_()
        ref = w64 / reference.spectral_norm_sigma(reference.weight_to_matrix(w64, dim), u.double(),
                                                  v.double())
        ref.backward(grad)
        assert_close_report(out, ref, atol=rt * ref.abs().max().item(), rtol=rt, name=f"{shape} W_sn")
        assert_close_report(wt.grad, w64.grad, atol=rt * w64.grad.abs().max().item(), rtol=rt,
                            name=f"{shape} dW")


def _misaligned_on(t: torch.Tensor) -> torch.Tensor:
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("placement", ["aligned", "misaligned"])
def test_gpu_sagan128_autocast_output_and_misaligned_storage(placement):
    """fp32 master weights, W_sn in bf16 (what autocast wants), model-level and per-layer, fwd +
    bwd, at SAGAN-128 sizes; "misaligned": every weight 4 bytes off a 16-byte boundary, so only
    the unhinted branches may run (a hint leaking into them would fault on a misaligned vector
    load): both match float64 (W_sn to one bf16 ulp, dW to fp32 rounding)."""
    from sagan_fast.ops.spectral_norm import spectral_norm_normalize_multi
    shapes = _sagan128_weight_shapes()
    problems = [_random_problem(s, d, torch.float32, device="cuda") for s, d in shapes]
    if placement == "misaligned":
        problems = [(_misaligned_on(w), u, v) for w, u, v in problems]
    dims = [d for _, d in shapes]
    us, vs = [u for _, u, _ in problems], [v for _, _, v in problems]
    for path in ("multi", "per_layer"):
        ws = [w.detach().clone() if placement == "aligned" else _misaligned_on(w) for w, _, _ in problems]
        for w in ws:
            w.requires_grad_()
        if path == "multi":
            outs = spectral_norm_normalize_multi(ws, us, vs, dims, backend="triton",
                                                 out_dtypes=[torch.bfloat16] * len(ws))
        else:
            outs = [spectral_norm_normalize(w, u, v, dim=d, backend="triton", out_dtype=torch.bfloat16)
                    for w, u, v, d in zip(ws, us, vs, dims)]
        grads = [torch.randn(o.shape, device="cuda", dtype=torch.float64).to(torch.bfloat16) for o in outs]
        torch.autograd.backward(outs, grads)
        for (shape, dim), w, u, v, out, g in zip(shapes, ws, us, vs, outs, grads):
            assert out.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
            ref, ref_grad = _fp64_normalize(w, u, v, dim, g)
            assert_close_report(out, ref, atol=0, rtol=ULP[torch.bfloat16] + 2e-6,
                                name=f"{path} {shape} W_sn")
            assert_close_report(w.grad, ref_grad, atol=1e-5 * ref_grad.abs().max().item(), rtol=1e-5,
                                name=f"{path} {shape} dW")
    u2, v2 = [u.clone() for u in us], [v.clone() for v in vs]
    sigmas = spectral_norm_power_iteration_([w for w, _, _ in problems], u2, v2, dims, backend="triton")
    for (shape, dim), (w, u, v), s in zip(shapes, problems, sigmas):
        assert_close_report(s, _reference_update(w, u, v, dim, 1)[2], atol=0, rtol=1e-5,
                            name=f"{shape} sigma")


@pytest.mark.gpu
@requires_cuda
def test_gpu_mixed_dtype_power_iteration_and_normalize_in_a_cuda_graph():
    """fp32 and bf16 weights in one call, captured in a CUDA graph after an eager warm-up (plans
    built then): capture needs no host copy, and every replay gives the eager results."""
    from sagan_fast.ops.spectral_norm import spectral_norm_normalize_multi
    shapes = _sagan128_weight_shapes()[:6]
    dtypes = [torch.float32, torch.bfloat16] * 3
    problems = [_random_problem(s, d, dt, device="cuda") for (s, d), dt in zip(shapes, dtypes)]
    dims = [d for _, d in shapes]
    ws = [w.clone().requires_grad_() for w, _, _ in problems]
    us, vs = [u.clone() for _, u, _ in problems], [v.clone() for _, _, v in problems]
    grads = [torch.randn_like(w) for w in ws]

    def step():
        for x, (_, u0, v0), y in zip(us, problems, vs):
            x.copy_(u0)
            y.copy_(v0)
        sigmas = spectral_norm_power_iteration_([w.detach() for w in ws], us, vs, dims, backend="triton")
        outs = spectral_norm_normalize_multi(ws, us, vs, dims, backend="triton")
        d_ws = torch.autograd.grad(outs, ws, grads)
        return [sigmas, *[o.detach() for o in outs], *d_ws]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = [t.clone() for t in step()]
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(eager, static):
            assert_close_report(b, a, atol=1e-6, rtol=1e-5, name="replay vs eager")
