"""SAGAN Generator / Discriminator: shapes, SN everywhere, attention, sn_impl interchange, errors."""

import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sagan_fast.models import (ConfigError, Discriminator, Generator, ModelConfig, build_models,
                               count_parameters)
from sagan_fast.nn import SelfAttention2d, SpectralNorm, update_spectral_norms
from tests.utils import assert_close_report

Z_DIM = 8
# Tiny widths keep every resolution fast on a CPU; 256 px needs the narrowest.
CH = {32: 4, 64: 2, 128: 2, 256: 1}


def _models(resolution=32, n_classes=0, **kwargs):
    ch = kwargs.pop("ch", CH[resolution])
    G = Generator(resolution, ch=ch, z_dim=Z_DIM, n_classes=n_classes, **kwargs)
    D = Discriminator(resolution, ch=ch, n_classes=n_classes, **kwargs)
    return G, D


def _labels(batch, n_classes):
    return torch.randint(0, n_classes, (batch,)) if n_classes else None


@pytest.mark.parametrize("n_classes", [0, 5], ids=["uncond", "cond"])
@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_shapes_every_resolution(resolution, n_classes):
    G, D = _models(resolution, n_classes)
    y = _labels(2, n_classes)
    with torch.no_grad():
        images = G(torch.randn(2, Z_DIM), y)
        logits = D(images, y)
    assert images.shape == (2, 3, resolution, resolution)
    assert images.abs().max() <= 1 and images.std() > 0.05  # tanh output, not collapsed at init
    assert logits.shape == (2,) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # Default attention at 32x32 exists in both models at every resolution.
    assert isinstance(G.attention, SelfAttention2d) and isinstance(D.attention, SelfAttention2d)


def _weight_layers(model):
    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)
    return [m for m in model.modules() if isinstance(m, kinds)]


# Expected weight-layer counts, derived by hand from the architecture (so a block that loses a layer,
# or a layer built outside the factory, fails). G: linear + blocks x (2 convs + shortcut) + attention
# (q, k, v) + output conv; 128 px: 1 + 5 x 3 + 3 + 1 = 20. D: blocks x 2 convs + a shortcut for
# every block that changes shape (at 32 px all but the last; at 64 px all, its last block goes
# 8ch -> 16ch; at 128 / 256 px all but the last, 16ch -> 16ch unpooled) + attention 3 + linear,
# + the projection embedding when conditional; 128 px: 12 + 5 + 3 + 1 = 21.
G_WEIGHT_LAYERS = {32: 14, 64: 17, 128: 20, 256: 23}
D_WEIGHT_LAYERS = {32: 15, 64: 19, 128: 21, 256: 24}


@pytest.mark.parametrize("sn_impl", ["sagan_fast", "torch", "none"])
@pytest.mark.parametrize("n_classes", [0, 4], ids=["uncond", "cond"])
@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_spectral_norm_on_every_conv_linear_embedding(resolution, sn_impl, n_classes):
    G, D = _models(resolution, n_classes, ch=1, sn_impl=sn_impl)
    expected_layers = ((G, G_WEIGHT_LAYERS[resolution]), (D, D_WEIGHT_LAYERS[resolution] + (n_classes > 0)))
    for model, expected in expected_layers:
        layers = _weight_layers(model)
        assert len(layers) == expected, f"{type(model).__name__}: {len(layers)} weight layers"
        for layer in layers:
            if sn_impl == "none":
                assert not parametrize.is_parametrized(layer)
                continue
            assert parametrize.is_parametrized(layer, "weight"), layer
            sn = layer.parametrizations.weight[0]
            if sn_impl == "sagan_fast":
                assert isinstance(sn, SpectralNorm) and sn._fused, layer
            else:
                assert type(sn).__name__ == "_SpectralNorm", layer


def test_no_layer_left_stale_after_a_forward():
    G, D = _models(32, 3)
    opt = torch.optim.SGD(G.parameters(), lr=0.01)
    y = _labels(2, 3)
    G(torch.randn(2, Z_DIM), y).mean().backward()
    opt.step()
    # The model-level pre-hook updates every SN weight the step changed, before the forward.
    G(torch.randn(2, Z_DIM), y)
    assert update_spectral_norms(G) == 0


def test_gamma_starts_at_zero_and_learns():
    G, D = _models(32, 0)
    assert G.attention.gamma.item() == 0 and D.attention.gamma.item() == 0
    images = G(torch.randn(2, Z_DIM))
    D(images).mean().backward()
    assert G.attention.gamma.grad.abs() > 0 and D.attention.gamma.grad.abs() > 0


@pytest.mark.parametrize("attn_resolution", [None, 0])
def test_attention_can_be_disabled(attn_resolution):
    G, D = _models(32, 0, attn_resolution=attn_resolution)
    assert G.attention is None and D.attention is None
    assert not any(isinstance(m, SelfAttention2d) for m in [*G.modules(), *D.modules()])
    with torch.no_grad():
        assert D(G(torch.randn(2, Z_DIM))).shape == (2,)


def test_attention_at_another_resolution():
    G, D = _models(64, 0, attn_resolution=16)
    # 64 px: G blocks end at 8, 16, 32, 64; D blocks at 32, 16, 8, 4, 4.
    assert G.attention_after == 1 and D.attention_after == 1
    assert G.attention.channels == 8 * CH[64] and D.attention.channels == 2 * CH[64]


@pytest.mark.parametrize("attention_impl", ["sdpa", "naive"])
def test_plain_attention_impls_match_ours(attention_impl):
    torch.manual_seed(3)
    G, D = _models(32, 2, attention_impl="sagan_fast")
    torch.manual_seed(3)
    G2, D2 = _models(32, 2, attention_impl=attention_impl)
    assert G.state_dict().keys() == G2.state_dict().keys()
    with torch.no_grad():
        for model in (G, G2, D, D2):
            model.attention.gamma.fill_(0.7)  # gamma 0 would hide the attention entirely
    z, y = torch.randn(3, Z_DIM), _labels(3, 2)
    x = G(z, y)
    # Same float32 math in a different order (SDPA may fuse): a few ulps of tanh-bounded values.
    assert_close_report(G2(z, y), x, atol=1e-5, rtol=1e-4, name=f"G {attention_impl}")
    assert_close_report(D2(x, y), D(x, y), atol=1e-4, rtol=1e-4, name=f"D {attention_impl}")


def test_torch_sn_state_dict_loads_into_ours_and_gives_same_outputs():
    G_t, D_t = _models(32, 3, sn_impl="torch")
    G_f, D_f = _models(32, 3, sn_impl="sagan_fast")
    # A training step on the torch models so the weights and u, v differ from init.
    opt = torch.optim.Adam([*G_t.parameters(), *D_t.parameters()], lr=1e-2)
    z, y = torch.randn(4, Z_DIM), _labels(4, 3)
    (D_t(G_t(z, y), y).mean() + D_t(torch.randn(4, 3, 32, 32), y).mean()).backward()
    opt.step()
    G_t(z, y), D_t(torch.randn(4, 3, 32, 32), y)  # one more forward: u, v iterate on the new weights
    G_f.load_state_dict(G_t.state_dict())
    D_f.load_state_dict(D_t.state_dict())
    for model in (G_t, D_t, G_f, D_f):
        model.eval()
    with torch.no_grad():
        x_t, x_f = G_t(z, y), G_f(z, y)
        # Same weights, u, v and float32 ops; only the sigma reduction order may differ.
        assert_close_report(x_f, x_t, atol=1e-5, rtol=1e-4, name="G eval")
        assert_close_report(D_f(x_t, y), D_t(x_t, y), atol=1e-4, rtol=1e-4, name="D eval")
    # And back: ours into torch's.
    G_t2 = Generator(32, ch=CH[32], z_dim=Z_DIM, n_classes=3, sn_impl="torch")
    G_t2.load_state_dict(G_f.state_dict())
    G_t2.eval()
    with torch.no_grad():
        assert_close_report(G_t2(z, y), x_t, atol=1e-5, rtol=1e-4, name="G round trip")


def test_same_seed_same_model_across_sn_impls():
    torch.manual_seed(5)
    G_t = Generator(32, ch=CH[32], z_dim=Z_DIM, sn_impl="torch")
    torch.manual_seed(5)
    G_f = Generator(32, ch=CH[32], z_dim=Z_DIM, sn_impl="sagan_fast")
    z = torch.randn(2, Z_DIM)
    # Training mode: both run one power iteration from identical u, v before the first forward.
    assert_close_report(G_f(z), G_t(z), atol=1e-5, rtol=1e-4, name="G train-mode forward")


def test_config_rebuilds_the_same_model():
    G, D = _models(64, 7, attn_resolution=16, init="xavier", attention_impl="naive")
    assert G.config == dict(resolution=64, ch=CH[64], z_dim=Z_DIM, n_classes=7, attn_resolution=16,
                            image_channels=3, sn_impl="sagan_fast", attention_backend=None, init="xavier",
                            attention_impl="naive", sn_backend=None)
    # Checkpoints store it as JSON-like data: it must round-trip.
    assert json.loads(json.dumps(D.config)) == D.config
    G2, D2 = Generator(**G.config), Discriminator(**D.config)
    G2.load_state_dict(G.state_dict())
    D2.load_state_dict(D.state_dict())
    assert count_parameters(G2) == count_parameters(G) == sum(p.numel() for p in G.parameters())


def test_config_holds_every_constructor_argument_as_called():
    """``model.config`` is read from the signature (each keyword spelled once): every parameter is
    in it, with the value of this call, defaults included, and rebuilding from it is equal."""
    import inspect

    for cls, extra in ((Generator, {"z_dim": 5}), (Discriminator, {})):
        model = cls(32, ch=2, attn_resolution=None, init="xavier", sn_impl="torch", **extra)
        params = [n for n in inspect.signature(cls).parameters]
        assert list(model.config) == params, cls.__name__
        for name in params:
            default = inspect.signature(cls).parameters[name].default
            expected = dict(resolution=32, ch=2, attn_resolution=None, init="xavier", sn_impl="torch",
                            **extra).get(name, default)
            assert model.config[name] == expected, (cls.__name__, name)
        assert cls(**model.config).config == model.config


def test_from_config_builds_what_the_keywords_build():
    cfg = ModelConfig(resolution=64, ch=2, z_dim=Z_DIM, n_classes=3, attn_resolution=16, init="xavier")
    torch.manual_seed(2)
    G, D = build_models(cfg, image_channels=1)
    torch.manual_seed(2)
    G2 = Generator(64, ch=2, z_dim=Z_DIM, n_classes=3, attn_resolution=16, init="xavier", image_channels=1)
    D2 = Discriminator(64, ch=2, n_classes=3, attn_resolution=16, init="xavier", image_channels=1)
    for a, b in ((G, G2), (D, D2)):
        assert a.config == b.config
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert Generator.image_channels_in(G.state_dict()) == 1
    assert Generator.image_channels_in(Generator(32, ch=1, z_dim=2, sn_impl="none").state_dict()) == 3
    # attn_resolution 0 in a config is None in the models; a config's own image_channels wins.
    none = ModelConfig(attn_resolution=0, image_channels=3, ch=1)
    G_none = Generator.from_config(none)
    assert G_none.attention is None and G_none.config["image_channels"] == 3


@pytest.mark.parametrize("make, match", [
    (lambda: ModelConfig(resolution=64, attn_resolution=64), "attn_resolution: .*both the generator and the "
                                                               r"discriminator have .*\[8, 16, 32\].*got 64"),
    (lambda: ModelConfig(ch=0), "ch: must be >= 1"),
    (lambda: Generator.from_config(ModelConfig()), "image_channels: .*pass image_channels="),
    (lambda: Generator.from_config(ModelConfig(image_channels=3), image_channels=1),
     "image_channels: the config says 3"),
], ids=["attn_in_G_only", "ch", "channels_missing", "channels_disagree"])
def test_model_config_errors(make, match):
    with pytest.raises(ConfigError, match=match):
        make()
    # Each model alone accepts what it can build: G at 64 px has a 64x64 map (D has not).
    assert Generator(64, ch=1, z_dim=2, attn_resolution=64).attention is not None


def test_count_parameters():
    G, _ = _models(32, 0)
    total = count_parameters(G)
    G.attention.gamma.requires_grad_(False)
    assert count_parameters(G, trainable_only=True) == total - 1
    # SN buffers (u, v) are not parameters.
    assert total == sum(p.numel() for p in G.parameters())


def test_grayscale_and_channels_last_and_bf16_autocast():
    G, D = _models(32, 3, image_channels=1)
    z, y = torch.randn(2, Z_DIM), _labels(2, 3)
    x = G(z, y)
    assert x.shape == (2, 1, 32, 32)
    expected = D(x, y)
    out = D(x.contiguous(memory_format=torch.channels_last), y)
    assert_close_report(out, expected, atol=1e-4, rtol=1e-4, name="D channels_last")
    G = G.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = G(z, y)
        logits = D(images, y)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all() and torch.isfinite(images).all()
    logits.mean().backward()
    grads = [p.grad for p in [*G.parameters(), *D.parameters()]]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("make, match", [
    (lambda: Generator(48), r"resolution: must be one of \(32, 64, 128, 256\), got 48"),
    (lambda: Discriminator(512), "resolution: must be one of .*got 512"),
    (lambda: Generator(32, ch=4, attn_resolution=4),
     r"attn_resolution: .*the generator has .*\[8, 16, 32\].*got 4$"),
    (lambda: Discriminator(64, ch=4, attn_resolution=64),
     "attn_resolution: .*the discriminator has .*got 64$"),
    (lambda: Generator(32, ch=4, sn_impl="apex"), "sn_impl"),
    (lambda: Discriminator(32, ch=4, init="kaiming"), "init"),
    (lambda: Generator(32, ch=4, attention_impl="flash"), "attention_impl"),
    (lambda: Generator(32, ch=0), "ch: must be >= 1, got 0"),
    (lambda: Generator(32, ch=4.0), "ch: must be an int"),
    (lambda: Discriminator(32, ch=4, image_channels=None), "image_channels: must be an int"),
    (lambda: Generator(32, ch=4, sn_backend="gpu"), "sn_backend: must be one of"),
    (lambda: Discriminator(32, ch=4, n_classes=-1), "n_classes"),
], ids=["G_res", "D_res", "G_attn", "D_attn", "sn_impl", "init", "attention_impl", "ch", "ch_float",
        "channels_none", "backend", "n_classes"])
def test_bad_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_forward_inputs():
    G, D = _models(32, 0)
    Gc, Dc = _models(32, 3)
    z, x, y = torch.randn(2, Z_DIM), torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    cases = [
        (lambda: G(z, y), ValueError, "unconditional"),
        (lambda: D(x, y), ValueError, "unconditional"),
        (lambda: Gc(z), ValueError, "class-conditional"),
        (lambda: Dc(x), ValueError, "class-conditional"),
        (lambda: Gc(z, torch.tensor([0, 3])), ValueError, r"in \[0, 3\)"),
        (lambda: Dc(x, torch.tensor([0])), ValueError, r"shape \(2,\)"),
        (lambda: G(torch.randn(2, Z_DIM + 1)), ValueError, rf"\(B, {Z_DIM}\)"),
        (lambda: G(torch.zeros(2, Z_DIM, dtype=torch.long)), ValueError, "float tensor"),
        (lambda: D(torch.randn(2, 3, 64, 64)), ValueError, r"\(B, 3, 32, 32\)"),
        (lambda: D(torch.randn(2, 1, 32, 32)), ValueError, r"\(B, 3, 32, 32\)"),
        (lambda: D(torch.randn(3, 32, 32)), ValueError, r"\(B, 3, 32, 32\)"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_models_on_triton_spectral_norm_match_reference():
    # Under TRITON_INTERPRET=1 on a CPU (conftest), the Triton SN kernels run in the interpreter.
    torch.manual_seed(4)
    G, D = _models(32, 3, attn_resolution=16, sn_backend="reference")
    torch.manual_seed(4)
    G2, D2 = _models(32, 3, attn_resolution=16, sn_backend="triton")
    z, y = torch.randn(2, Z_DIM), _labels(2, 3)
    x = G(z, y)
    # float32 kernels vs float32 torch ops, reductions in another order: ulps of O(1) values.
    assert_close_report(G2(z, y), x, atol=1e-5, rtol=1e-4, name="G triton SN")
    assert_close_report(D2(x, y), D(x, y), atol=1e-4, rtol=1e-4, name="D triton SN")


def test_gan_step_under_torch_compile():
    """D compiled (aot_eager: the tracing is what breaks torch's SN; inductor's codegen is not
    ours to test), called on real then on fake before one backward, stepped, then called again:
    its SN must see the new weights. G stays eager to keep the test cheap: same layers as D."""
    torch.manual_seed(6)
    G, D = _models(32, 3, attn_resolution=16)
    torch.manual_seed(6)
    _, D_eager = _models(32, 3, attn_resolution=16)
    D_c = torch.compile(D, backend="aot_eager")
    z, y, real = torch.randn(2, Z_DIM), _labels(2, 3), torch.randn(2, 3, 32, 32)
    fake = G(z, y)
    results = []
    for d in (D_c, D_eager):
        opt_d = torch.optim.SGD(d.parameters(), lr=0.05)
        d_loss = torch.relu(1 - d(real, y)).mean() + torch.relu(1 + d(fake.detach(), y)).mean()
        d_loss.backward()
        opt_d.step()
        g_loss = -d(fake, y).mean()  # D's weights changed: its SN must update first
        (grad_fake,) = torch.autograd.grad(g_loss, fake, retain_graph=True)
        results.append((d_loss.detach(), g_loss.detach(), grad_fake))
    for name, compiled, eager in zip(("D loss", "G loss", "dG_loss/dfake"), *results):
        assert_close_report(compiled, eager, atol=1e-5, rtol=1e-4, name=f"compiled {name}")
