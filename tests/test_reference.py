"""The plain-PyTorch references are themselves right: against torch's spectral-norm parametrization
step by step, against independent computations of the attention, and by gradcheck in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from sagan_fast.ops import reference
from tests.utils import assert_close_report

# Float64 against float64 doing the same products in the same order (or a re-association of
# them): differences are rounding only, a few ulps of O(1) values.
F64 = dict(atol=1e-12, rtol=1e-10)


class _VectorWeight(nn.Module):
    """A module with a 1-D weight: torch normalizes it exactly (no power iteration)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(13))

    def forward(self, x):
        return x * self.weight


# Odd sizes; the transposed conv's weight is (in, out, kh, kw) and torch normalizes along dim 1.
SN_MODULES = {
    "conv2d": lambda: nn.Conv2d(5, 7, 3),
    "conv_transpose2d": lambda: nn.ConvTranspose2d(5, 7, (3, 2)),
    "linear": lambda: nn.Linear(11, 9),
    "conv1d_tall": lambda: nn.Conv1d(3, 17, 1),  # more rows than columns
    "vector": _VectorWeight,
}


@pytest.mark.parametrize("n_power_iterations", [1, 2])
@pytest.mark.parametrize("case", list(SN_MODULES))
def test_reference_spectral_norm_equals_torch_step_by_step(case, n_power_iterations):
    module = SN_MODULES[case]().double()
    torch_spectral_norm(module, n_power_iterations=n_power_iterations)
    param = module.parametrizations.weight
    dim = reference.default_spectral_norm_dim(module)
    assert dim == (1 if case == "conv_transpose2d" else 0)
    sn = param[0]
    u, v = (sn._u.clone(), sn._v.clone()) if hasattr(sn, "_u") else (None, None)
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    for step in range(3):
        w_torch = module.weight  # a training-mode evaluation: updates torch's u, v in place
        w_ref, u, v, sigma = reference.spectral_norm(param.original, u, v, dim=dim,
                                                     n_power_iterations=n_power_iterations)
        assert_close_report(w_ref, w_torch, **F64, name=f"{case} W_sn step {step}")
        if u is not None:
            assert_close_report(u, sn._u, **F64, name=f"{case} u step {step}")
            assert_close_report(v, sn._v, **F64, name=f"{case} v step {step}")
            # sigma = u . W v, and the factor between the raw and the normalized weight.
            mat = reference.weight_to_matrix(param.original.detach(), dim)
            assert_close_report(sigma, torch.vdot(u, mat @ v), **F64, name=f"{case} sigma = u.Wv")
            assert_close_report(param.original.detach() / sigma, w_torch, **F64, name=f"{case} sigma")
        opt.zero_grad()
        w_torch.pow(3).sum().backward()
        opt.step()  # the weight moves, so the next step iterates on a new matrix
    module.eval()
    w_ref, u_eval, v_eval, _ = reference.spectral_norm(param.original, sn._u if u is not None else None,
                                                       sn._v if u is not None else None, dim=dim,
                                                       training=False)
    assert_close_report(w_ref, module.weight, **F64, name=f"{case} eval")
    if u is not None:  # eval does not iterate: u, v come back unchanged
        assert u_eval is sn._u and v_eval is sn._v


def test_reference_power_iteration_eps_is_a_floor_on_the_norm():
    # A weight so small that ||W v|| < eps: torch's F.normalize divides by eps instead.
    module = nn.Linear(6, 4).double()
    with torch.no_grad():
        module.weight.mul_(1e-4)
    torch_spectral_norm(module, eps=1e-2)
    sn = module.parametrizations.weight[0]
    u, v = sn._u.clone(), sn._v.clone()
    w_torch = module.weight
    w_ref, u_ref, v_ref, _ = reference.spectral_norm(module.parametrizations.weight.original, u, v, eps=1e-2)
    assert u_ref.norm() < 0.5  # floored: not a unit vector
    assert_close_report(u_ref, sn._u, **F64, name="u")
    assert_close_report(v_ref, sn._v, **F64, name="v")
    assert_close_report(w_ref, w_torch, **F64, name="W_sn")


@pytest.mark.parametrize("dim", [0, 1, 3])
def test_weight_matrix_round_trip(dim):
    weight = torch.randn(3, 5, 2, 7)
    mat = reference.weight_to_matrix(weight, dim)
    assert mat.shape == (weight.shape[dim], weight.numel() // weight.shape[dim])
    assert torch.equal(reference.matrix_to_weight_shape(mat, weight.shape, dim), weight)
    with pytest.raises(ValueError, match="more than 1 dimension"):
        reference.weight_to_matrix(torch.randn(4))


def _unit(n, generator=None):
    return F.normalize(torch.randn(n, dtype=torch.float64, generator=generator), dim=0)


@pytest.mark.parametrize("shape, dim", [((7, 5), 0), ((4, 3, 3, 2), 0), ((3, 5, 2, 3), 1)],
                         ids=["linear", "conv", "conv_transpose"])
def test_spectral_norm_backward_closed_form_equals_autograd(shape, dim):
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    rows = shape[dim]
    u, v = _unit(rows), _unit(weight.numel() // rows)  # any u, v: the formula holds for all
    w_sn, _, _, sigma = reference.spectral_norm(weight, u, v, dim=dim, training=False)
    grad_out = torch.randn(shape, dtype=torch.float64)
    (autograd,) = torch.autograd.grad(w_sn, weight, grad_out)
    closed = reference.spectral_norm_backward(grad_out, w_sn.detach(), u, v, sigma, dim)
    assert_close_report(closed, autograd, **F64, name="dW")
    # Not trivially G / sigma: the rank-one correction is there.
    assert (closed - grad_out / sigma).abs().max() > 1e-3


@pytest.mark.parametrize("shape, dim", [((7, 5), 0), ((3, 5, 2, 3), 1)], ids=["linear", "conv_transpose"])
def test_gradcheck_spectral_norm_normalize(shape, dim):
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    u, v = _unit(shape[dim]), _unit(weight.numel() // shape[dim])  # constants for autograd

    def normalize(w):
        return reference.spectral_norm(w, u, v, dim=dim, training=False)[0]

    assert torch.autograd.gradcheck(normalize, (weight,))
    assert torch.autograd.gradgradcheck(normalize, (weight,))


def _qkv(B, N, Nk, E, Ev, requires_grad=False):
    def make(*s):
        return torch.randn(*s, dtype=torch.float64, requires_grad=requires_grad)
    return make(B, N, E), make(B, Nk, E), make(B, Nk, Ev)


@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_reference_attention_equals_explicit_loops(scale):
    q, k, v = _qkv(2, 5, 7, 3, 4)
    q = q * 2  # scores of order several units: softmax far from uniform
    out = reference.sagan_attention(q, k, v, scale=scale)
    expected = torch.empty(2, 5, 4, dtype=torch.float64)
    for b in range(2):
        for i in range(5):
            scores = [scale * sum(q[b, i, e] * k[b, j, e] for e in range(3)) for j in range(7)]
            top = max(scores)
            weights = [torch.exp(s - top) for s in scores]
            total = sum(weights)
            expected[b, i] = sum(w / total * v[b, j] for j, w in enumerate(weights))
    assert_close_report(out, expected, **F64, name="attention")
    lse = reference.sagan_attention_lse(q, k, scale=scale)
    expected_lse = torch.log(torch.exp(scale * torch.einsum("bie,bje->bij", q, k)).sum(-1))
    assert_close_report(lse, expected_lse, **F64, name="lse")


def test_reference_attention_no_sqrt_scale_and_rows_sum_to_one():
    q, k, _ = _qkv(1, 9, 11, 5, 1)
    v = torch.ones(1, 11, 1, dtype=torch.float64)
    assert_close_report(reference.sagan_attention(q, k, v), torch.ones(1, 9, 1, dtype=torch.float64), **F64,
                        name="rows sum to 1")
    # SAGAN has no 1/sqrt(E): scale=1 differs from scale=1/sqrt(E).
    _, _, v = _qkv(1, 9, 11, 5, 3)
    unscaled, scaled = reference.sagan_attention(q, k, v), reference.sagan_attention(q, k, v, scale=5 ** -0.5)
    assert (unscaled - scaled).abs().max() > 1e-3


def _self_attention_einsum(x, w_query, w_key, w_value, gamma, w_out, pool_keys):
    """SAGAN block written independently: 1x1 convs as einsum, 2x2 max-pool as reshape + amax."""
    B, C, H, W = x.shape
    f = torch.einsum("oc,bchw->bohw", w_query[:, :, 0, 0], x)
    g = torch.einsum("oc,bchw->bohw", w_key[:, :, 0, 0], x)
    h = torch.einsum("oc,bchw->bohw", w_value[:, :, 0, 0], x)
    if pool_keys:
        def pool(t):
            t = t[:, :, : H // 2 * 2, : W // 2 * 2]
            return t.reshape(B, t.shape[1], H // 2, 2, W // 2, 2).amax(dim=(3, 5))
        g, h = pool(g), pool(h)
    scores = torch.einsum("bei,bej->bij", f.flatten(2), g.flatten(2))  # (B, N, Nk)
    beta = torch.exp(scores - scores.amax(-1, keepdim=True))
    beta = beta / beta.sum(-1, keepdim=True)
    o = torch.einsum("bij,bvj->bvi", beta, h.flatten(2)).reshape(B, -1, H, W)
    if w_out is not None:
        o = torch.einsum("cv,bvhw->bchw", w_out[:, :, 0, 0], o)
    return x + gamma * o


def _self_attention_inputs(pool_keys, requires_grad=False):
    B, C, H, W = 2, 9, 5, 6  # odd C; H odd so pooling drops a row, as max_pool2d does
    E, Ev = 2, 5 if pool_keys else 9

    def make(*s):
        return torch.randn(*s, dtype=torch.float64, requires_grad=requires_grad)
    w_out = make(C, Ev, 1, 1) if pool_keys else None  # BigGAN form has the output conv
    return (make(B, C, H, W), make(E, C, 1, 1), make(E, C, 1, 1), make(Ev, C, 1, 1),
            make(()) if requires_grad else torch.tensor(0.8, dtype=torch.float64), w_out)


@pytest.mark.parametrize("pool_keys", [False, True], ids=["paper", "biggan"])
def test_reference_self_attention_2d_equals_einsum(pool_keys):
    args = _self_attention_inputs(pool_keys)
    out = reference.self_attention_2d(*args, pool_keys=pool_keys)
    assert_close_report(out, _self_attention_einsum(*args, pool_keys), **F64, name="self_attention_2d")


def test_gradcheck_sagan_attention():
    q, k, v = _qkv(2, 5, 7, 3, 4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: reference.sagan_attention(q, k, v), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: reference.sagan_attention(q, k, v, scale=0.5), (q, k, v))


@pytest.mark.parametrize("pool_keys", [False, True], ids=["paper", "biggan"])
def test_gradcheck_self_attention_2d(pool_keys):
    args = _self_attention_inputs(pool_keys, requires_grad=True)
    inputs = tuple(a for a in args if a is not None)

    def block(x, wq, wk, wv, gamma, *w_out):
        return reference.self_attention_2d(x, wq, wk, wv, gamma, w_out[0] if w_out else None,
                                           pool_keys=pool_keys)

    # max-pool is piecewise linear: random inputs sit away from its ties, so gradcheck is exact.
    assert torch.autograd.gradcheck(block, inputs)
