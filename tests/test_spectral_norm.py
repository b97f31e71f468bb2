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

from sagan_fast.nn.spectral_norm import (SpectralNormError, check_spectral_norms, fuse_spectral_norms,
                                         set_check_finite, spectral_norm, spectral_norm_layers,
                                         update_spectral_norms)
from sagan_fast.ops import BackendUnavailableError, reference
from sagan_fast.ops.spectral_norm import (spectral_norm_normalize, spectral_norm_power_iteration_,
                                          spectral_norm_sigma)
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
    out = spectral_norm_normalize(w_t, u.to(dtype), v.to(dtype), sigma.to(torch.promote_types(dtype, torch.float32)),
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
    with pytest.raises(ValueError, match="unknown backend"):
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
    for p, p2 in zip(list(g.parameters()) + list(d.parameters()), list(g2.parameters()) + list(d2.parameters())):
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
        ref = w64 / reference.spectral_norm_sigma(reference.weight_to_matrix(w64, dim), u.double(), v.double())
        grad = torch.randn_like(w64)
        ref.backward(grad)
        wt = w.clone().requires_grad_()
        out = spectral_norm_normalize(wt, u, v, s, dim=dim, backend="triton")
        out.backward(grad.to(dtype))
        # bf16: outputs rounded to bf16 (2^-8) and sigma vs the bf16-rounded u, v
        rt = 1e-5 if dtype == torch.float32 else 2e-2
        assert_close_report(out, ref, atol=rt * ref.abs().max().item(), rtol=rt, name=f"{shape} W_sn")
        assert_close_report(wt.grad, w64.grad, atol=rt * w64.grad.abs().max().item(), rtol=rt, name=f"{shape} dW")


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
        ref = w64 / reference.spectral_norm_sigma(reference.weight_to_matrix(w64, dim), u.double(), v.double())
        ref.backward(grad)
        assert_close_report(out, ref, atol=rt * ref.abs().max().item(), rtol=rt, name=f"{shape} W_sn")
        assert_close_report(wt.grad, w64.grad, atol=rt * w64.grad.abs().max().item(), rtol=rt, name=f"{shape} dW")
