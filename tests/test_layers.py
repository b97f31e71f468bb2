"""Drop-in layers: SN layers match torch's layer + torch's spectral_norm; ConditionalBatchNorm2d."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from sagan_fast.nn import (ConditionalBatchNorm2d, SNConv2d, SNConvTranspose2d, SNEmbedding, SNLinear,
                           SpectralNorm, update_spectral_norms)
from tests.utils import assert_close_report

# (our class, torch class, constructor args and kwargs, an input maker); odd sizes on purpose.
LAYER_CASES = {
    "conv2d": (SNConv2d, nn.Conv2d, (3, 5, 3), dict(stride=2, padding=1, bias=False),
               lambda: torch.randn(2, 3, 9, 7, dtype=torch.float64)),
    "conv_transpose2d": (SNConvTranspose2d, nn.ConvTranspose2d, (3, 7, 4), dict(stride=2, padding=1),
                         lambda: torch.randn(2, 3, 5, 3, dtype=torch.float64)),
    "linear": (SNLinear, nn.Linear, (11, 6), {}, lambda: torch.randn(3, 11, dtype=torch.float64)),
    "embedding": (SNEmbedding, nn.Embedding, (7, 5), {}, lambda: torch.tensor([0, 6, 3, 3])),
}


def _pair(case: str):
    ours_cls, torch_cls, args, kwargs, make_input = LAYER_CASES[case]
    torch.manual_seed(1)
    ours = ours_cls(*args, **kwargs).double()
    torch.manual_seed(1)  # same draws: the layer init, then u and v
    theirs = torch_spectral_norm(torch_cls(*args, **kwargs)).double()
    return ours, theirs, make_input


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_sn_layer_matches_torch_layer_with_torch_sn(case):
    ours, theirs, make_input = _pair(case)
    assert isinstance(ours, LAYER_CASES[case][0])
    assert isinstance(ours.parametrizations.weight[0], SpectralNorm)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1)
    x = make_input()
    # Two training steps (each changes the weight, so each forward iterates once in both), then eval.
    for step in range(2):
        out_ours, out_theirs = ours(x), theirs(x)
        # float64 throughout, same ops in the same order up to fusion: 1e-12 is rounding only.
        assert_close_report(out_ours, out_theirs, atol=1e-12, rtol=1e-10, name=f"{case} step {step}")
        for out, opt in ((out_ours, opt_ours), (out_theirs, opt_theirs)):
            opt.zero_grad()
            out.pow(2).sum().backward()
            opt.step()
    g_ours, g_theirs = ours.parametrizations.weight.original, theirs.parametrizations.weight.original
    assert_close_report(g_ours, g_theirs, atol=1e-12, rtol=1e-10, name=f"{case} weight after 2 steps")
    # Ours iterated right after the last step, torch iterates at its next training forward: after
    # one, both hold u, v of the current weight, and eval uses them.
    assert_close_report(ours(x), theirs(x), atol=1e-12, rtol=1e-10, name=f"{case} after the last step")
    ours.eval(), theirs.eval()
    assert_close_report(ours(x), theirs(x), atol=1e-12, rtol=1e-10, name=f"{case} eval")


def test_conv_transpose_normalizes_dim_1_and_sigma_converges_to_one():
    layer = SNConvTranspose2d(4, 9, 3).double()
    sn = layer.parametrizations.weight[0]
    assert sn.dim == 1 and sn._u.shape == (9,) and sn._v.shape == (4 * 3 * 3,)
    for _ in range(50):
        update_spectral_norms(layer, force=True)
    w_sn = layer.weight  # (in, out, kh, kw): the matrix is out x (in*kh*kw)
    sigma = torch.linalg.matrix_norm(w_sn.transpose(0, 1).flatten(1), ord=2)
    # 50 power iterations on a random 9 x 36 matrix: the estimate converges geometrically.
    assert abs(sigma.item() - 1.0) < 1e-6, sigma.item()


def test_sn_keyword_arguments_reach_the_parametrization():
    layer = SNLinear(6, 4, bias=False, n_power_iterations=3, eps=1e-6, sn_dim=1, sn_backend="reference")
    sn = layer.parametrizations.weight[0]
    assert (sn.n_power_iterations, sn.eps, sn.dim, sn.backend) == (3, 1e-6, 1, "reference")
    assert layer.bias is None and sn._u.shape == (6,)
    with pytest.raises(ValueError, match="n_power_iterations"):
        SNConv2d(3, 4, 1, n_power_iterations=0)


# ----------------------------------------------------------------------------------------------
# ConditionalBatchNorm2d
# ----------------------------------------------------------------------------------------------

def _batch_norm_by_hand(x: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def test_conditional_batch_norm_starts_as_plain_batch_norm():
    cbn = ConditionalBatchNorm2d(5, n_classes=3).double()
    assert torch.equal(cbn.gain, torch.ones(3, 5, dtype=torch.float64))
    assert torch.equal(cbn.bias, torch.zeros(3, 5, dtype=torch.float64))
    x = torch.randn(4, 5, 3, 7, dtype=torch.float64)
    y = torch.tensor([2, 0, 0, 1])
    assert_close_report(cbn(x, y), _batch_norm_by_hand(x, 1e-5), atol=1e-12, rtol=1e-10, name="cbn at init")


def test_conditional_batch_norm_applies_each_samples_class_gain_and_bias():
    cbn = ConditionalBatchNorm2d(5, n_classes=3, eps=1e-3).double()
    with torch.no_grad():
        cbn.gain.copy_(torch.randn(3, 5))
        cbn.bias.copy_(torch.randn(3, 5))
    x = torch.randn(4, 5, 3, 7, dtype=torch.float64) * 3 + 1
    y = torch.tensor([2, 0, 0, 1])
    out = cbn(x, y)
    normalized = _batch_norm_by_hand(x, 1e-3)
    for b in range(4):  # per sample: its own class's row, broadcast over space
        expected = cbn.gain[y[b]][:, None, None] * normalized[b] + cbn.bias[y[b]][:, None, None]
        assert_close_report(out[b], expected, atol=1e-12, rtol=1e-10, name=f"cbn sample {b}")
    # Only the rows of classes present receive gradient.
    out.sum().backward()
    assert cbn.gain.grad[[0, 1, 2]].abs().sum(1).gt(0).all()
    cbn.zero_grad()
    cbn(x, torch.tensor([0, 0, 0, 0])).pow(2).sum().backward()
    assert cbn.gain.grad[1:].abs().max() == 0 and cbn.bias.grad[1:].abs().max() == 0
    assert cbn.gain.grad[0].abs().min() > 0


def test_conditional_batch_norm_accepts_int32_labels():
    cbn = ConditionalBatchNorm2d(3, n_classes=4)
    with torch.no_grad():
        cbn.gain.copy_(torch.randn(4, 3))
    x, y = torch.randn(3, 3, 2, 5), torch.tensor([3, 0, 3])
    assert torch.equal(cbn(x, y.int()), cbn(x, y))


def test_conditional_batch_norm_eval_uses_shared_running_stats():
    cbn = ConditionalBatchNorm2d(3, n_classes=2, momentum=1.0).double()  # momentum 1: stats = last batch
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64) * 2 + 3
    cbn(x, torch.zeros(6, dtype=torch.long))
    cbn.eval()
    mean = x.mean(dim=(0, 2, 3))[None, :, None, None]
    var = x.var(dim=(0, 2, 3), unbiased=True)[None, :, None, None]  # running_var is unbiased (as BN)
    expected = (x - mean) / torch.sqrt(var + 1e-5)
    # Both classes share the statistics; gains are 1 and biases 0 still.
    assert_close_report(cbn(x, torch.ones(6, dtype=torch.long)), expected, atol=1e-12, rtol=1e-10,
                        name="cbn eval")


def test_conditional_batch_norm_channels_last_and_bf16_autocast():
    cbn = ConditionalBatchNorm2d(4, n_classes=3)
    x = torch.randn(2, 4, 5, 5)
    y = torch.tensor([1, 2])
    expected = cbn(x, y)
    assert_close_report(cbn(x.to(memory_format=torch.channels_last), y), expected, atol=1e-6, rtol=1e-5,
                        name="channels_last")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cbn(x.bfloat16(), y)
    assert torch.isfinite(out).all()
    # bf16 has an 8-bit mantissa: 2^-8 relative, on values of order 3 after normalization.
    assert_close_report(out.float(), expected, atol=3e-2, rtol=1e-2, name="autocast")


@pytest.mark.parametrize("x_shape, y, error, match", [
    ((2, 5, 3, 3), torch.tensor([0, 1]), ValueError, r"expects \(B, 4, H, W\)"),
    ((2, 4, 3), torch.tensor([0, 1]), ValueError, r"expects \(B, 4, H, W\)"),
    ((2, 4, 3, 3), torch.tensor([0.0, 1.0]), TypeError, "integer class indices"),
    ((2, 4, 3, 3), torch.tensor([0, 1], dtype=torch.uint8), TypeError, "integer class indices"),
    ((2, 4, 3, 3), torch.tensor([0, 1, 2]), ValueError, r"shape \(2,\)"),
    ((2, 4, 3, 3), torch.tensor([[0, 1]]), ValueError, r"shape \(2,\)"),
    ((2, 4, 3, 3), torch.tensor([0, 3]), ValueError, r"in \[0, 3\)"),
    ((2, 4, 3, 3), torch.tensor([-1, 0]), ValueError, r"in \[0, 3\)"),
    ((2, 4, 3, 3), None, TypeError, "LongTensor"),
], ids=["channels", "rank", "float_y", "uint8_y", "y_batch", "y_rank", "y_too_big", "y_negative", "y_none"])
def test_conditional_batch_norm_bad_input(x_shape, y, error, match):
    cbn = ConditionalBatchNorm2d(4, n_classes=3)
    with pytest.raises(error, match=match):
        cbn(torch.randn(x_shape), y)


def test_conditional_batch_norm_bad_construction():
    with pytest.raises(ValueError, match="n_classes"):
        ConditionalBatchNorm2d(4, n_classes=0)


def test_layers_are_exported_and_behave_like_torch_layers():
    conv = SNConv2d(3, 8, kernel_size=3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    out = conv(x)
    # The forward is exactly F.conv2d with the normalized weight.
    assert_close_report(out, F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-6, rtol=1e-5,
                        name="SNConv2d forward")


# ----------------------------------------------------------------------------------------------
# Drop-in frictions: backend=, BigGAN's conditioning vector, the attention map
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, args", [(SNLinear, (8, 4)), (SNConv2d, (3, 4, 3)),
                                       (SNConvTranspose2d, (3, 4, 3)), (SNEmbedding, (5, 3))],
                         ids=lambda c: getattr(c, "__name__", ""))
def test_sn_layers_take_backend_as_the_readme_says(cls, args):
    assert cls(*args, backend="reference").parametrizations.weight[0].backend == "reference"
    assert cls(*args, sn_backend="reference").parametrizations.weight[0].backend == "reference"  # older name
    both = cls(*args, backend="reference", sn_backend="reference")
    assert both.parametrizations.weight[0].backend == "reference"
    with pytest.raises(ValueError, match="backend='reference' and sn_backend='triton' disagree"):
        cls(*args, backend="reference", sn_backend="triton")


def test_snlinear_backend_triton_runs():
    import os
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    layer = SNLinear(8, 4, backend="triton")
    ref = SNLinear(8, 4, backend="reference")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8)
    assert_close_report(layer(x), ref(x), atol=1e-6, rtol=1e-5, name="triton vs reference")


def test_conditional_batch_norm_with_a_float_vector_is_biggans_form():
    cbn = ConditionalBatchNorm2d(5, cond_dim=6, eps=1e-3, backend="reference").double()
    assert isinstance(cbn.cond_gain.parametrizations.weight[0], SpectralNorm)  # SN linear maps
    assert cbn.cond_bias.bias is None and not hasattr(cbn, "gain")
    x = torch.randn(4, 5, 3, 7, dtype=torch.float64) * 3 + 1
    c = torch.randn(4, 6, dtype=torch.float64)
    out = cbn(x, c)
    gain = 1 + c @ cbn.cond_gain.weight.t()
    bias = c @ cbn.cond_bias.weight.t()
    expected = gain[:, :, None, None] * _batch_norm_by_hand(x, 1e-3) + bias[:, :, None, None]
    assert_close_report(out, expected, atol=1e-12, rtol=1e-10, name="vector-conditioned cbn")
    out.square().sum().backward()
    assert cbn.cond_gain.parametrizations.weight.original.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"shape \(4, 6\)"):
        cbn(x, c[:, :5])
    with pytest.raises(TypeError, match="construct it with n_classes="):
        cbn(x, torch.tensor([0, 1, 0, 1]))


def test_conditional_batch_norm_with_both_forms():
    cbn = ConditionalBatchNorm2d(3, n_classes=4, cond_dim=2)
    x = torch.randn(2, 3, 4, 4)
    assert cbn(x, torch.tensor([1, 3])).shape == cbn(x, torch.randn(2, 2)).shape == x.shape
    with pytest.raises(TypeError, match="cond_dim=<vector size>"):
        ConditionalBatchNorm2d(3, n_classes=4)(x, torch.randn(2, 2))
    with pytest.raises(ValueError, match="cond_dim"):
        ConditionalBatchNorm2d(3)


@pytest.mark.parametrize("biggan", [False, True], ids=["paper", "biggan"])
def test_self_attention_returns_the_attention_map_when_asked(biggan):
    from sagan_fast.nn import SelfAttention2d
    torch.manual_seed(3)
    kwargs = dict(pool_keys=True, value_channels=8, out_conv=True) if biggan else {}
    block = SelfAttention2d(16, backend="reference", **kwargs).double()
    with torch.no_grad():
        block.gamma.fill_(0.7)
    x = torch.randn(2, 16, 6, 4, dtype=torch.float64)
    y, attention = block(x, return_attention=True)
    n, nk = 6 * 4, (3 * 2 if biggan else 6 * 4)
    assert attention.shape == (2, n, nk)
    assert_close_report(attention.sum(-1), torch.ones(2, n, dtype=torch.float64), atol=1e-12, rtol=0,
                        name="rows")
    assert_close_report(y, block(x), atol=1e-12, rtol=1e-10, name="y with and without the map")
    # the map is the one y is made of: o = h attention^T, y = x + gamma * out(o)
    f = F.conv2d(x, block.query.weight).flatten(2)
    g = F.conv2d(x, block.key.weight)
    if biggan:
        g = F.max_pool2d(g, 2)
    expected = torch.softmax(f.transpose(1, 2) @ g.flatten(2), dim=-1)
    assert_close_report(attention, expected, atol=1e-12, rtol=1e-10, name="attention map")


def test_self_attention_wrong_value_channels_says_what_to_pass():
    from sagan_fast.nn import SelfAttention2d
    with pytest.raises(ValueError, match=r"pass value_channels=64 \(or leave it out\).*or out_conv=True"):
        SelfAttention2d(64, value_channels=32)
