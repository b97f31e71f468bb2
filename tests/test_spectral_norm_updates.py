"""Spectral norm sees every weight change exactly once, on every backend.

- every torch.optim optimizer in its for-loop, foreach and fused forms (CPU here; capturable,
  fused-on-CUDA and CUDA-graph steps in the `gpu` tests): after the steps the largest singular
  value of the W_sn the next training forward uses is 1, equal to torch's own spectral norm in the
  same loop, and exactly one power iteration ran per step;
- writes autograd sees (no_grad updates, copy_, load_state_dict, lerp_ / EMA, .to() / .double());
- writes it cannot see (``.data``): every backend gives the same W / (u . W v) until
  mark_weights_changed, then one power iteration; gradcheck of the weight in training mode;
- torch.compile: an optimizer step inside a compiled step; unfused layers with no graph break and
  no recompile per layer shape.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sagan_fast.nn import (SpectralNormError, assert_normalized, fuse_spectral_norms,
                           load_spectral_norm_state, mark_weights_changed, normalized_sigmas,
                           power_iteration_residuals, spectral_norm, spectral_norm_layers,
                           spectral_norm_state, update_spectral_norms)
from sagan_fast.ops import reference
from tests.sn_cases import (AVAILABLE_BACKENDS, BACKENDS, give_spectral_gap_, make_optimizer,
                            next_forward_sigmas, optimizer_forms, sn_model, sn_weights, train, update_counts)
from tests.utils import assert_close_report, requires_cuda

STEPS = 50


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _forms_ids(forms):
    return [f"{name}-{form}" for name, form in forms]


CPU_FORMS = optimizer_forms("cpu")
# The update mechanism (the optimizer hook, version counters) is the same for every backend; what
# differs per backend is its kernels. So the reference and cuda backends run every optimizer form
# and Triton, ~13 s a case in its CPU interpreter, one per kind of step (a plain loop, foreach, fused,
# a closure): the whole matrix with SAGAN_FAST_FULL_OPTIMIZER_MATRIX=1.
TRITON_FORMS = [f for f in CPU_FORMS if f in {("SGD", "for-loop"), ("Adam", "foreach"), ("Adam", "fused"),
                                              ("AdamW", "fused"), ("LBFGS", "default")}]
if os.environ.get("SAGAN_FAST_FULL_OPTIMIZER_MATRIX", "0") not in ("", "0"):
    TRITON_FORMS = CPU_FORMS
CASES = [pytest.param(name, form, backend, id=f"{name}-{form}-{backend}", marks=marks)
         for backend, marks in ((getattr(b, "values", [b])[0], getattr(b, "marks", ())) for b in BACKENDS)
         for name, form in (TRITON_FORMS if backend == "triton" else CPU_FORMS)]


@pytest.mark.parametrize("name,form,backend", CASES)
def test_every_optimizer_form_updates_once_per_step(name, form, backend):
    steps = STEPS
    ours = sn_model(backend, linear_only=name == "Muon")
    theirs = sn_model(None, linear_only=name == "Muon", torch_sn=True)
    for model in (ours, theirs):
        give_spectral_gap_(model)
        train(model, make_optimizer(name, form, model.parameters()), steps)
    # The first forward iterates once (as torch's first forward), then one per optimizer step.
    assert update_counts(ours) == [steps + 1] * len(update_counts(ours))
    sigmas, torch_sigmas = next_forward_sigmas(ours), next_forward_sigmas(theirs)
    assert update_counts(ours) == [steps + 1] * len(sigmas), "the next forward iterated again"
    # A skipped update leaves W_sn's norm at 1.3-1.8 here; one iteration per update tracks to ~1e-3.
    assert all(abs(s - 1) < 2e-3 for s in sigmas), sigmas
    # Same math as torch's spectral norm (which iterates in the forward after each step): fp32
    # kernels against torch's fp32 ops, after up to 50 steps.
    tol = 1e-6 if backend == "reference" else 2e-4
    assert all(abs(s - t) <= tol for s, t in zip(sigmas, torch_sigmas)), (sigmas, torch_sigmas)
    # And u, v are from a power iteration on the weight as it is now (what a skipped update breaks).
    assert max(power_iteration_residuals(ours).values()) < 1e-5


def test_hook_skips_parameters_without_gradient_and_marks_eval_layers_stale():
    model = sn_model("reference")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    train(model, opt, 2)
    assert update_counts(model) == [3, 3, 3]
    conv = model[0].parametrizations.weight
    conv.original.grad = None  # the optimizer skips it: no change, no iteration
    opt.step()
    assert update_counts(model) == [3, 4, 4]
    model.eval()
    opt.step()  # eval: no iteration now (torch iterates only in training) ...
    assert update_counts(model) == [3, 4, 4]
    model.train()
    train(model, opt, 1)  # ... but the next training forward iterates the stale ones, then the step
    assert update_counts(model) == [4, 6, 6]


def test_optimizer_map_follows_copies_and_replaced_weights():
    """A deepcopy (e.g. to make a second D) is a new set of layers; a weight replaced by a new
    Parameter is the layer's weight from then on."""
    model = copy.deepcopy(sn_model("reference"))
    give_spectral_gap_(model)
    train(model, torch.optim.Adam(model.parameters(), lr=1e-2, fused=True), 30)
    assert update_counts(model) == [31] * 3
    plist = model[5].parametrizations.weight
    plist.original = nn.Parameter(plist.original.detach() * 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, fused=True)
    train(model, opt, 5)
    assert update_counts(model) == [36, 36, 37]  # the new weight: one iteration at its first forward
    assert all(abs(s - 1) < 2e-3 for s in next_forward_sigmas(model))


def _one_iteration(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int):
    mat = reference.weight_to_matrix(w.detach().double(), dim)
    return reference.spectral_norm_power_iteration(mat, u.double(), v.double(), 1)


def _write(kind: str, model: nn.Module) -> nn.Module:
    """Change every SN weight of ``model`` the way ``kind`` says; returns the model to run next."""
    g = torch.Generator().manual_seed(7)
    if kind == "load_state_dict":
        other = sn_model("reference", seed=5)
        train(other, torch.optim.SGD(other.parameters(), lr=0.05), 2)
        model.load_state_dict(other.state_dict())
        return model
    with torch.no_grad():
        if kind == "no_grad_update":
            for w, _ in sn_weights(model):
                w.add_(0.05 * torch.randn(w.shape, generator=g))
        elif kind == "copy_":
            for w, _ in sn_weights(model):
                w.copy_(w * 0.9 + 0.05 * torch.randn(w.shape, generator=g))
        elif kind == "lerp_ema":
            other = sn_model("reference", seed=5)
            for (w, _), (w2, _) in zip(sn_weights(model), sn_weights(other)):
                w.lerp_(w2, 0.1)
        elif kind == "double":
            model = model.double()
        else:
            raise ValueError(kind)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["no_grad_update", "copy_", "lerp_ema", "load_state_dict", "double"])
def test_writes_autograd_sees_trigger_exactly_one_iteration(kind, backend):
    model = sn_model(backend)
    x = torch.randn(2, 3, 4, 4)
    model(x)
    before = [(sn._u.clone(), sn._v.clone()) for sn, _ in spectral_norm_layers(model)]
    model = _write(kind, model)
    layers = list(spectral_norm_layers(model))
    if kind == "load_state_dict":  # u, v come from the checkpoint too
        before = [(sn._u.clone(), sn._v.clone()) for sn, _ in layers]
    model(x.to(next(model.parameters()).dtype))
    assert update_counts(model) == [2, 2, 2]
    # float64 after .double(); float32 otherwise: the reference in fp32 ops, the kernels' sums of
    # up to 256 products in another order.
    tol = 1e-12 if kind == "double" else (1e-6 if backend == "reference" else 2e-5)
    for (sn, w), (u0, v0) in zip(layers, before):
        u_ref, v_ref = _one_iteration(w, u0, v0, sn.dim)
        assert_close_report(sn._u, u_ref, atol=tol, rtol=0, name=f"{kind} u")
        assert_close_report(sn._v, v_ref, atol=tol, rtol=0, name=f"{kind} v")
    model(x.to(next(model.parameters()).dtype))
    assert update_counts(model) == [2, 2, 2], "a second forward must not iterate again"


def test_dtype_change_with_swap_tensors_keeps_the_optimizer_map():
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model = sn_model("reference")
        give_spectral_gap_(model)
        model.double()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(4, 3, 4, 4, generator=g).double(), torch.randn(4, 8, generator=g).double()
        for _ in range(20):
            opt.zero_grad()
            (model(x) - y).square().mean().backward()
            opt.step()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert update_counts(model) == [21] * 3
    assert all(abs(s - 1) < 2e-3 for s in next_forward_sigmas(model))


def _data_write(model: nn.Module) -> None:
    """A weight-clipping-sized change (spectral norm ~0.03) through .data: no version bump."""
    g = torch.Generator().manual_seed(11)
    for w, dim in sn_weights(model):
        rows, cols = reference.weight_to_matrix(w, dim).shape
        w.data.add_(0.03 * torch.randn(w.shape, generator=g) / (rows ** 0.5 + cols ** 0.5))


def test_data_writes_same_result_on_every_backend_until_marked():
    """After a ``.data`` write every backend normalizes the new W by its own u . W v with the old
    u, v (no backend uses a sigma of the previous weight); after mark_weights_changed, one update."""
    x = torch.randn(3, 3, 4, 4)
    outs, w_sns = {}, {}
    for backend in AVAILABLE_BACKENDS:
        model = sn_model(backend)
        give_spectral_gap_(model)
        model(x)
        _data_write(model)
        w_sns[backend] = [m.weight.detach().clone() for m in model.modules()
                          if hasattr(m, "parametrizations")]
        outs[backend] = model(x).detach()
        assert update_counts(model) == [1, 1, 1], "a .data write is invisible: no update yet"
        for (w, dim), (sn, _), w_sn in zip(sn_weights(model), spectral_norm_layers(model), w_sns[backend]):
            mat = reference.weight_to_matrix(w.detach().double(), dim)
            sigma = reference.spectral_norm_sigma(mat, sn._u.double(), sn._v.double())
            expected = w.detach().double() / sigma
            assert_close_report(w_sn, expected, atol=2e-6, rtol=2e-5, name=f"{backend} W / (u.W v)")
        assert mark_weights_changed(model) == 3
        model(x)
        assert update_counts(model) == [2, 2, 2]
        sigmas = next_forward_sigmas(model)
        assert all(abs(s - 1) < 2e-3 for s in sigmas), sigmas
    for backend, out in outs.items():
        assert_close_report(out, outs["reference"], atol=1e-5, rtol=1e-4, name=f"{backend} vs reference")


def _skip_updates(monkeypatch) -> None:
    """Every power-iteration update becomes a no-op that still marks its layer fresh: what an
    update missed by the update mechanism looks like from outside (u, v left for an older weight)."""
    snmod = sys.modules["sagan_fast.nn.spectral_norm"]

    def skipped(items, check_finite):
        for sn, weight, _, _ in items:
            object.__setattr__(sn, "_seen", snmod._weight_key(weight))
    monkeypatch.setattr(snmod, "_power_iterate", skipped)


@pytest.mark.parametrize("backend", BACKENDS)
def test_assert_normalized_sees_a_skipped_update_that_sigma_misses(backend, monkeypatch):
    """After one skipped update the sigma of W_sn is still within 2% (stale u, v misjudge sigma
    only at second order in the weight change); the power-iteration residual sees it at first
    order, so assert_normalized (every benchmark's end check) fails; the next real update repairs it."""
    model = sn_model(backend)
    give_spectral_gap_(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, opt, 3)
    assert_normalized(model)
    assert max(power_iteration_residuals(model).values()) < 1e-5
    with monkeypatch.context() as patch:
        _skip_updates(patch)
        train(model, opt, 1)
    assert all(abs(s - 1) < 0.02 for s in normalized_sigmas(model).values())
    assert min(power_iteration_residuals(model).values()) > 1e-3
    with pytest.raises(SpectralNormError, match="3 weight.*update was skipped"):
        assert_normalized(model)
    train(model, opt, 1)
    assert_normalized(model)


def test_assert_normalized_asks_for_mark_weights_changed_after_a_data_write():
    x = torch.randn(2, 3, 4, 4)
    model = sn_model("reference")
    give_spectral_gap_(model)
    for _ in range(10):  # converged u, v for the new weights
        update_spectral_norms(model, force=True)
    assert_normalized(model)
    _data_write(model)  # invisible: the layers still count themselves up to date
    with pytest.raises(SpectralNormError, match="mark_weights_changed"):
        assert_normalized(model)
    mark_weights_changed(model)
    assert power_iteration_residuals(model) == {}  # the next training forward updates them all
    assert_normalized(model)
    model(x)
    assert_normalized(model)
    assert max(power_iteration_residuals(model).values()) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True], ids=["per-layer", "fused"])
def test_double_backward_through_the_normalization(fused, backend, monkeypatch):
    """create_graph=True (Hessian-vector products, penalties on weight gradients) differentiates
    the normalization's backward: the kernels' closed form is not differentiable, so the backward
    runs as plain ops then (the cuda backend gave silently wrong second derivatives, triton's fused
    path too, its per-layer op raised); a plain backward still runs the kernels."""
    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Linear(5, 12), backend=backend), nn.Unflatten(1, (3, 2, 2)),
                          nn.Tanh(), spectral_norm(nn.ConvTranspose2d(3, 2, 2), backend=backend)).double()
    if fused:
        fuse_spectral_norms(model)
    x = torch.randn(4, 5, dtype=torch.float64)
    model(x)
    weights = tuple(w for w, _ in sn_weights(model))
    assert torch.autograd.gradgradcheck(lambda *w: model(x), weights)
    calls = []
    real = reference.spectral_norm_normalize_grad
    monkeypatch.setattr(reference, "spectral_norm_normalize_grad", lambda *a: calls.append(1) or real(*a))
    model(x).square().sum().backward()
    assert calls == [] or backend == "reference", "a plain backward must run the kernels"
    grads = torch.autograd.grad(model(x).square().sum(), weights, create_graph=True)
    assert all(g.requires_grad for g in grads)
    assert backend == "reference" or len(calls) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_of_the_weight_in_training_mode(backend):
    """torch's own check (its test_new_spectral_norm): gradcheck perturbs the weight through .data,
    so the layer does not iterate and W_sn = W / (u . W v) is a fixed function of W."""
    torch.manual_seed(0)
    layer = spectral_norm(nn.Linear(5, 7).double(), backend=backend)
    conv_t = spectral_norm(nn.ConvTranspose2d(3, 4, 3).double(), backend=backend)  # dim 1
    x, xc = torch.randn(3, 5, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    layer(x), conv_t(xc)  # the first training forward iterates; gradcheck's calls do not
    for module, inp in ((layer, x), (conv_t, xc)):
        weight = module.parametrizations.weight.original
        assert torch.autograd.gradcheck(lambda w, m=module, i=inp: m(i), (weight,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_step_inside_a_compiled_step(backend):
    """forward, backward and opt.step() in one torch.compile'd function (aot_eager): the hook runs
    eagerly after the compiled optimizer step; the same updates, losses and W_sn as eager."""
    results = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = sn_model(backend)
        give_spectral_gap_(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 8, generator=g)

        def step():
            opt.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            opt.step()
            return loss.detach()
        fn = torch.compile(step, backend="aot_eager") if compiled else step
        losses = [fn().item() for _ in range(6)]
        results[compiled] = (losses, update_counts(model), next_forward_sigmas(model))
    torch._dynamo.reset()
    (losses, counts, sigmas), (losses_c, counts_c, sigmas_c) = results[False], results[True]
    assert counts_c == counts == [7, 7, 7]
    assert losses_c == pytest.approx(losses, rel=1e-5)
    assert sigmas_c == pytest.approx(sigmas, abs=1e-5)
    assert all(abs(s - 1) < 2e-3 for s in sigmas_c), sigmas_c


def _ten_layer_model(backend):
    torch.manual_seed(0)
    layers, c = [], 3
    for i in range(10):  # ten different weight shapes (the recompile limit is 8)
        layers += [spectral_norm(nn.Conv2d(c, c + 1 + i, 3, padding=1), backend=backend), nn.LeakyReLU(0.1)]
        c = c + 1 + i
    return nn.Sequential(*layers)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unfused_layers_compile_to_one_graph(backend):
    """torch's own SN gives 1 graph and 0 breaks on this model; so must ours."""
    torch._dynamo.reset()
    model, x = _ten_layer_model(backend), torch.randn(2, 3, 6, 6)
    explanation = torch._dynamo.explain(model)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_foreign_gan_without_fusing_updates_and_never_recompiles(backend):
    """torch.compile(G) of a GAN that did not call fuse_spectral_norms: one compile for all ten
    layer shapes (any recompile is an error here), the update decided at run time (one per
    optimizer step, none for G's second call in an iteration), the same losses as eager."""
    torch._dynamo.reset()

    def gan():
        torch.manual_seed(3)
        G = nn.Sequential(_ten_layer_model(backend), nn.Conv2d(58, 3, 1), nn.Tanh())
        D = nn.Sequential(spectral_norm(nn.Conv2d(3, 4, 3), backend=backend), nn.LeakyReLU(0.1), nn.Flatten(),
                          spectral_norm(nn.Linear(4 * 4 * 4, 1), backend=backend))
        return G, D

    def run(G, D, compiled):
        opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=2e-3, betas=(0.0, 0.9)) for m in (G, D))
        g_fn, d_fn = (torch.compile(G, backend="aot_eager") if compiled else G), D
        gen = torch.Generator().manual_seed(4)
        losses = []
        for _ in range(3):
            z = torch.randn(2, 3, 6, 6, generator=gen)
            real = torch.randn(2, 3, 6, 6, generator=gen)
            fake = g_fn(z)
            loss_d = F.relu(1 - d_fn(real)).mean() + F.relu(1 + d_fn(fake.detach())).mean()
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            loss_g = -d_fn(g_fn(z)).mean()
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            losses.append((loss_d.item(), loss_g.item()))
        return losses

    G, D = gan()
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses = run(G, D, compiled=True)
    assert update_counts(G) == [4] * 10 and update_counts(D) == [4, 4]
    G2, D2 = gan()
    expected = run(G2, D2, compiled=False)
    for (a, b), (c, d) in zip(losses, expected):
        assert abs(a - c) <= 1e-5 * (1 + abs(c)) and abs(b - d) <= 1e-5 * (1 + abs(d)), (losses, expected)
    torch._dynamo.reset()


def test_resume_needs_no_extra_iteration():
    """spectral_norm_state / load_spectral_norm_state: a restored model is as fresh as the saved
    one, so its next forward does not iterate (bit-exact resume)."""
    model = sn_model("reference")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    train(model, opt, 3)
    state, sn_state = copy.deepcopy(model.state_dict()), spectral_norm_state(model)
    restored = sn_model("reference", seed=9)
    restored.load_state_dict(state)
    load_spectral_norm_state(restored, sn_state)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(restored(x), model(x))
    assert update_counts(restored) == [0, 0, 0]
    assert normalized_sigmas(restored) == normalized_sigmas(model)


def test_fused_model_is_updated_by_the_hook_too():
    model = fuse_spectral_norms(sn_model("reference"))
    give_spectral_gap_(model)
    train(model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), 20)
    assert update_counts(model) == [21] * 3
    assert all(abs(s - 1) < 2e-3 for s in next_forward_sigmas(model))
    assert update_spectral_norms(model) == 0  # nothing stale left


# --- GPU: capturable and fused optimizers on CUDA, steps inside a CUDA graph ---------------------

GPU_BACKENDS = ["reference", "triton", "cuda"]


def _gpu_step_fn(model, opt, x, y):
    def step():
        opt.zero_grad(set_to_none=False)
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        return loss.detach()
    return step


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(fused=True), dict(capturable=True), dict(foreach=True)],
                         ids=["fused", "capturable", "foreach"])
def test_gpu_optimizer_forms(kwargs, backend):
    model = sn_model(backend).cuda()
    give_spectral_gap_(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, **kwargs)
    train(model, opt, STEPS, device="cuda")
    assert update_counts(model) == [STEPS + 1] * 3
    assert all(abs(s - 1) < 2e-3 for s in next_forward_sigmas(model))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(fused=True, capturable=True), dict(capturable=True)],
                         ids=["fused", "capturable"])
def test_gpu_steps_inside_a_cuda_graph(kwargs, backend):
    """The hook runs while the step is captured: the power iteration is in the graph, right after
    the optimizer, and every replay runs it once; no mark_weights_changed after replays."""
    model = sn_model(backend).cuda()
    give_spectral_gap_(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, **kwargs)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 3, 4, 4, generator=g).cuda(), torch.randn(4, 8, generator=g).cuda()
    step = _gpu_step_fn(model, opt, x, y)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: lazy optimizer state, Triton tables
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    counts = update_counts(model)
    w_before = [w.detach().clone() for w, _ in sn_weights(model)]
    for _ in range(STEPS):
        graph.replay()
    torch.cuda.synchronize()
    assert update_counts(model) == counts, "replays run captured updates; the host counts none"
    assert any(not torch.equal(a, b) for a, b in zip(w_before, (w for w, _ in sn_weights(model))))
    assert all(abs(s - 1) < 2e-3 for s in next_forward_sigmas(model))
    assert update_counts(model) == counts, "fresh after the replays: the next forward does not iterate"


# --- the benchmark script's update table, hook cost and timing run (small, CPU) ------------------

def _bench():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "spectral_norm.py"
    spec = importlib.util.spec_from_file_location("bench_spectral_norm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_update_table_and_hook_cost_run(tmp_path, capsys):
    import json
    bench = _bench()
    out = tmp_path / "table.json"
    assert bench.main(["--update-table", "--device", "cpu", "--backends", "reference",
                       "--optimizers", "Adam,LBFGS", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["optimizer"], r["form"]) for r in rows} >= {("Adam", "fused"), ("Adam", "foreach"),
                                                           ("LBFGS", "default")}
    assert all(r["ok"] == "yes" and r["updates_per_step"] == "1.00" for r in rows), rows
    assert bench.main(["--hook-cost", "--device", "cpu", "--backends", "reference", "--hook-reps", "20"]) == 0
    assert "| reference |" in capsys.readouterr().out


def test_bench_timing_ends_normalized(tmp_path):
    import json
    bench = _bench()
    out = tmp_path / "timing.json"
    assert bench.main(["--quick", "--device", "cpu", "--backends", "reference", "--resolution", "32",
                       "--ch", "4", "--n-classes", "0", "--dtypes", "fp32,amp-bf16", "--json", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if "max_sigma_minus_1" in r]
    assert len(rows) == 4 and all(r["max_sigma_minus_1"] < 0.02 for r in rows)
    assert {r["dtype"] for r in rows} == {"float32", "float32 W, autocast bfloat16"}


def test_bench_timing_fails_when_the_timed_path_skips_power_iterations(tmp_path, monkeypatch):
    """The timed path forgets ``force=True``: its updates after the first do nothing (the weights
    never change while timed). u, v start random, so W_sn is not normalized and the run fails."""
    import json
    bench = _bench()
    real = bench.update_spectral_norms
    monkeypatch.setattr(bench, "update_spectral_norms",
                        lambda model, force=False, check_finite=None: real(model, check_finite=check_finite))
    out = tmp_path / "timing.json"
    assert bench.main(["--quick", "--device", "cpu", "--backends", "reference", "--resolution", "32",
                       "--ch", "4", "--n-classes", "0", "--dtypes", "fp32", "--json", str(out)]) == 1
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert "error" not in rows["torch parametrization"]
    assert "SpectralNormError" in rows["sagan_fast reference"]["error"]


def test_train_step_bench_check_fails_when_updates_are_skipped(monkeypatch):
    """bench/train_step.py's end check on a real SAGAN step: a run whose updates were all skipped
    ends with every sigma within the bench's tolerance (u, v from the registration's warm-up
    iterations, small Adam steps), and still fails; the same run with its updates passes."""
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_train_step_sn", root / "bench" / "train_step.py")
    bench = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(root / "bench"))
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(root / "bench"))
    for skip in (False, True):
        with monkeypatch.context() as patch:
            if skip:
                _skip_updates(patch)
            G, D, opt_G, opt_D = bench.build("fast", 32, 4, 0, 16, torch.device("cpu"))
            real = torch.rand(2, 3, 32, 32) * 2 - 1
            step = bench.make_step("fast", G, D, opt_G, opt_D, real, None, "fp32", False)
            for _ in range(2):
                step()
        sigmas = {**normalized_sigmas(G), **normalized_sigmas(D)}
        assert all(abs(s - 1) <= bench.SN_TOLERANCE for s in sigmas.values())
        error = bench.check_normalized("fast", G, D)
        assert (error is None) != skip, error
        if skip:
            assert "update was skipped" in error


def test_bench_traffic_counts_launches_and_table_uploads(tmp_path):
    """--traffic (no GPU): the triton path's launches recorded per phase: a fused forward or
    backward is 2 launches whatever the layer count, per layer 2 each, the power iteration 3;
    the gradient table is uploaded once and then found for the same gradients; W_sn in bf16
    halves its bytes."""
    import json
    bench = _bench()
    out = tmp_path / "traffic.json"
    assert bench.main(["--traffic", "--resolution", "32", "--ch", "4", "--n-classes", "0",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(r["config"], r["phase"]): r for r in report["rows"]}
    layers = report["args"]["layers"]
    for config in ("fp32", "fp32 W, bf16 W_sn (autocast)"):
        def row(prefix):
            return next(r for (c, p), r in rows.items() if c == config and p.startswith(prefix))
        assert row("power iteration")["launches"] == 3 and row("power iteration")["W_passes"] == 2
        fused_fwd, fused_bwd = row("normalize forward, model-level"), row("normalize backward, model-level")
        assert (fused_fwd["launches"], fused_bwd["launches"]) == (2, 2)
        assert (fused_fwd["W_passes"], fused_fwd["W_sn_or_G_passes"]) == (2, 1)
        assert fused_bwd["table_uploads"] == 1
        assert row("normalize backward, model-level (fuse_spectral_norms), same")["table_uploads"] == 0
        assert row("normalize forward, per layer")["launches"] == 2 * layers
        assert row("normalize backward, per layer")["launches"] == 2 * layers
    weights = report["args"]["weights"]
    amp = rows[("fp32 W, bf16 W_sn (autocast)", "normalize forward, model-level (fuse_spectral_norms)")]
    assert abs(amp["MB"] - 10 * weights / 1e6) < 1e-6  # 2 fp32 reads + a bf16 write


def test_a_weight_tied_into_two_layers_updates_both():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 5, bias=False), nn.Linear(6, 5, bias=False)
    b.weight = a.weight  # tied
    spectral_norm(a, backend="reference"), spectral_norm(b, backend="reference")
    assert a.parametrizations.weight.original is b.parametrizations.weight.original
    opt = torch.optim.Adam([a.parametrizations.weight.original], lr=1e-2, fused=True)
    x = torch.randn(3, 6)
    for _ in range(3):
        opt.zero_grad()
        (a(x).square().sum() + b(x).sum()).backward()
        opt.step()
    assert update_counts(a) == [4] and update_counts(b) == [4]  # fused: no version counter to see it
