"""PyTorch's own spectral-norm tests (test/nn/test_parametrization.py: test_new_spectral_norm,
..._load_state_dict, ..._dim, ..._forward, ..._value), their logic ported to our
:func:`sagan_fast.nn.spectral_norm` and run on every backend; plus the per-update equivalents
where torch's per-forward semantics differ from ours by design (torch iterates at every training
forward, we once per weight change).
"""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.testing import assert_close

from sagan_fast.nn import mark_weights_changed, spectral_norm
from tests.sn_cases import BACKENDS


@pytest.fixture(params=[False, True], ids=["assign", "swap"])
def swap(request):
    """torch runs each of these tests twice (its ``@swap([True, False])``): module conversions and
    ``load_state_dict`` assigning ``.data`` (the default) or swapping the tensors
    (``torch.__future__.set_swap_module_params_on_conversion(True)``)."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(request.param)
    yield request.param
    torch.__future__.set_swap_module_params_on_conversion(previous)


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_spectral_norm(backend, swap):
    """Structure (parameters, buffers, removal, several registrations), training / eval behaviour,
    gradcheck through repeated and mixed-mode forwards."""
    dtype = torch.float64
    m = spectral_norm(nn.Linear(5, 7, dtype=dtype), backend=backend)
    sn = m.parametrizations.weight[0]
    assert sn._u.size() == torch.Size([m.weight.size(0)])
    assert hasattr(m.parametrizations.weight, "original")            # trainable original
    assert "original" in m.parametrizations.weight._parameters
    assert "_u" in sn._buffers and "_v" in sn._buffers                # u, v: buffers
    assert m.weight is not None and "weight" not in m._buffers and "weight" not in m._parameters
    assert m.parametrizations.weight.original.size() == m.weight.size()
    assert m.parametrizations.weight.original.stride() == m.weight.stride()

    m = parametrize.remove_parametrizations(m, "weight")
    assert not hasattr(m, "parametrizations") and "weight" in m._parameters
    # several registrations on one parameter, and one on a 1-D parameter
    m = spectral_norm(m, "weight", backend=backend)
    m = spectral_norm(m, "weight", backend=backend)
    m = spectral_norm(m, "bias", backend=backend)
    m = parametrize.remove_parametrizations(m, "bias")
    assert "bias" in m._parameters and hasattr(m, "parametrizations") and "weight" not in m._parameters
    m = parametrize.remove_parametrizations(m, "weight")
    assert not hasattr(m, "parametrizations") and "weight" in m._parameters
    assert not parametrize.is_parametrized(m)

    for requires_grad in (True, False):
        def get_modules():
            m = nn.Linear(3, 4, dtype=dtype)
            m.weight.requires_grad_(requires_grad)
            m = spectral_norm(m, backend=backend)
            return m, m.parametrizations.weight[0]

        x = torch.randn(2, 3, dtype=dtype)
        m, sn = get_modules()
        u0, v0 = sn._u.clone(), sn._v.clone()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        opt.zero_grad()
        m(x).sum().backward()
        opt.step()
        out = m(x)
        if requires_grad:  # u and v were updated (by the step: ours iterate right after it)
            assert not torch.equal(u0, sn._u) and not torch.equal(v0, sn._v)
            torch.autograd.grad(out.sum(), m.parametrizations.weight.original)  # backprop reaches it

        saved_u, saved_v = sn._u.clone(), sn._v.clone()

        def fn(inp):
            sn._u.data.copy_(saved_u)
            sn._v.data.copy_(saved_v)
            return m(inp) + m(inp)  # two forwards, one backward
        fn(x.clone().requires_grad_()).sum().backward()
        assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(),), check_batched_grad=False)

        # removal in eval mode keeps the last training output
        m, _ = get_modules()
        before = m(x).detach()
        m.eval()
        m = parametrize.remove_parametrizations(m, "weight")
        assert_close(m(x), before, rtol=0, atol=0)
        spectral_norm(m, backend=backend)
        for _ in range(3):
            before = m(x).detach()
        m.eval()
        m = parametrize.remove_parametrizations(m, "weight")
        assert_close(m(x), before, rtol=0, atol=0)

        # eval: the last training output, and no change to u, v
        m, sn = get_modules()
        m(x)
        last_train_out = m(x)
        last_u, last_v = sn._u.clone(), sn._v.clone()
        m.zero_grad()
        m.eval()
        eval_out = m(x)
        assert_close(eval_out, last_train_out, rtol=0, atol=0)
        assert_close(eval_out, m(x), rtol=0, atol=0)
        assert torch.equal(last_u, sn._u) and torch.equal(last_v, sn._v)

        saved_u, saved_v = sn._u.clone(), sn._v.clone()

        def fn_mixed(inp):
            sn._u.data.copy_(saved_u)
            sn._v.data.copy_(saved_v)
            m.train()
            out0 = m(inp)
            m.eval()
            out1 = m(inp)
            m.train()
            out2 = m(inp)
            m.eval()
            return out0 + out1 + out2 + m(inp)
        assert torch.autograd.gradcheck(fn_mixed, (x.clone().requires_grad_(),))
        if requires_grad:  # backprop reaches the original weight in eval
            assert torch.autograd.gradcheck(lambda w: m(x), (m.parametrizations.weight.original,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activate_times", [0, 3])
def test_new_spectral_norm_load_state_dict(activate_times, backend, swap):
    x = torch.randn(2, 3)
    snm = spectral_norm(nn.Linear(3, 5), backend=backend)
    snm.train()
    for _ in range(activate_times):
        snm(x)
    state_dict = deepcopy(snm.state_dict())
    assert set(state_dict) == {"parametrizations.weight.original", "bias", "parametrizations.weight.0._v",
                               "parametrizations.weight.0._u"}

    # non-strict loading
    loose = deepcopy(state_dict)
    loose["nonsense"] = "nonsense"
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "nonsense"'):
        snm.load_state_dict(loose, strict=True)
    snm.load_state_dict(loose, strict=False)
    for key in ("parametrizations.weight.original", "parametrizations.weight.0._u",
                "parametrizations.weight.0._v"):
        del loose[key]
        snm.load_state_dict(loose, strict=False)
    loose["weight"] = snm.weight.detach().clone()  # W as a buffer
    snm.load_state_dict(loose, strict=False)
    del loose._metadata["parametrizations.weight.0"]
    snm.load_state_dict(loose, strict=False)
    del loose["weight"]
    snm.load_state_dict(loose, strict=False)
    del loose["bias"]
    snm.load_state_dict(loose, strict=False)

    def rewrap(snm):
        return spectral_norm(parametrize.remove_parametrizations(snm, "weight"), backend=backend)

    def outputs(snm):
        snm.load_state_dict(state_dict)
        with torch.no_grad():
            snm.eval()
            out0 = snm(x)
            snm.train()
            out1, out2 = snm(x), snm(x)
            snm.eval()
            return out0, out1, out2, snm(x)
    first = outputs(rewrap(snm))
    for a, b in zip(first, outputs(rewrap(snm))):  # re-wrapping does not matter
        assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_spectral_norm_dim(backend, swap):
    x = torch.randn(2, 3, 10, 12)
    m = spectral_norm(nn.ConvTranspose2d(3, 4, (5, 6)), backend=backend)
    m(x)  # no shape mismatch
    assert m.parametrizations.weight[0]._u.shape == m.parametrizations.weight.original[0, :, 0, 0].shape


def _naive_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torch's test: one power iteration from the stored v, by hand, written into W through .data."""
    weight, bias, v = m.parametrizations.weight.original, m.bias, m.parametrizations.weight[0]._v
    mat = weight.view(weight.size(0), -1)
    u = F.normalize(torch.mv(mat, v), dim=0, eps=1e-12)
    v = F.normalize(torch.mv(mat.t(), u), dim=0, eps=1e-12)
    weight.data /= torch.dot(u, torch.matmul(mat, v))
    return F.linear(x, weight, bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_spectral_norm_forward(backend, swap):
    x = torch.randn(3, 5)
    m = spectral_norm(nn.Linear(5, 7), backend=backend)
    expected = _naive_forward(m, x)
    # (the first forward after registration iterates, whatever was written before it)
    assert_close(m(x), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_spectral_norm_forward_per_update(backend, swap):
    """Per update: after a forward, the same .data write is invisible until mark_weights_changed
    (then the layer iterates, as torch's forward does every time); before, W is normalized by its
    own u . W v with the stored u, v."""
    x = torch.randn(3, 5)
    m = spectral_norm(nn.Linear(5, 7), backend=backend)
    m(x)
    plist = m.parametrizations.weight
    u, v = plist[0]._u.clone(), plist[0]._v.clone()
    expected = _naive_forward(m, x)
    w = plist.original.detach()
    assert_close(m(x), F.linear(x, w / torch.dot(u, torch.mv(w, v)), m.bias))
    plist[0]._v.copy_(v)
    mark_weights_changed(m)
    assert_close(m(x), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float, torch.cfloat], ids=str)
def test_new_spectral_norm_value(dtype, backend, swap):
    """The spectral norm of a diagonal matrix is its largest |entry| (complex: the kernels route
    complex weights to the reference path)."""
    m = nn.Linear(2, 2, dtype=dtype)
    with torch.no_grad():
        x = torch.diagonal(m.weight)
        m.weight = nn.Parameter(torch.diag(x))
        spectral_norm(m, backend=backend)
        assert_close(m.weight.data, torch.diag(x / x.abs().max()))


# --- per-update equivalents ------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
def test_repeated_forwards_equal_torch_with_one_forward_per_step(dtype, backend, swap):
    """Torch iterates at every training forward; ours once per weight change. So ours with three
    forwards per step (D on real, on fake, a no_grad look) equals torch with one forward per step."""
    torch.manual_seed(4)
    ours = nn.Linear(6, 5, dtype=dtype)
    theirs = deepcopy(ours)
    torch.manual_seed(5)
    spectral_norm(ours, backend=backend)
    torch.manual_seed(5)
    nn.utils.parametrizations.spectral_norm(theirs)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (ours, theirs)]
    x = torch.randn(4, 6, dtype=dtype)
    for _ in range(4):
        out_theirs = theirs(x)
        with torch.no_grad():
            ours(x)
        out_ours = ours(x) + ours(x) - ours(x)
        assert_close(out_ours, out_theirs, rtol=1e-10, atol=1e-12)
        for out, opt in ((out_ours, opts[0]), (out_theirs, opts[1])):
            opt.zero_grad()
            out.abs().square().sum().backward()
            opt.step()
        assert_close(ours.parametrizations.weight.original, theirs.parametrizations.weight.original,
                     rtol=1e-10, atol=1e-12)


# --- porting from torch's old hook API (torch.nn.utils.spectral_norm) ------------------------

def _hook_sagan_d(sn):
    torch.manual_seed(6)
    return nn.Sequential(sn(nn.Conv2d(3, 6, 3)), nn.LeakyReLU(0.1), sn(nn.ConvTranspose2d(6, 4, 3, stride=2)),
                         nn.Flatten(), sn(nn.Linear(4 * 9 * 9, 1)), nn.Tanh())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pre_1_0", [False, True], ids=["weight_v", "no_weight_v"])
def test_converted_hook_state_dict_loads_and_continues_the_run(pre_1_0, backend, swap):
    """A model trained with torch.nn.utils.spectral_norm (keys weight_orig, weight_u, weight_v),
    its state dict converted: the same eval output, and the same first training forward (both
    iterate once from the saved u, v). Pre-1.0 checkpoints stored W / sigma instead of weight_v."""
    from sagan_fast.nn import convert_hook_spectral_norm_state_dict
    old = _hook_sagan_d(nn.utils.spectral_norm)
    opt = torch.optim.SGD(old.parameters(), lr=0.05)
    x = torch.randn(2, 3, 6, 6)
    for _ in range(3):
        opt.zero_grad()
        old(x).sum().backward()
        opt.step()
    old.eval()
    old(x)  # the hook sets module.weight = W / sigma at each forward: now for the current W
    state = old.state_dict()
    assert any(k.endswith("weight_orig") for k in state) and any(k.endswith("weight_v") for k in state)
    if pre_1_0:
        for prefix in ("0", "2", "4"):
            module = old.get_submodule(prefix)
            del state[f"{prefix}.weight_v"]
            state[f"{prefix}.weight"] = module.weight.detach().clone()  # W / sigma, as stored then
    ours = _hook_sagan_d(lambda m: spectral_norm(m, backend=backend))
    ours.load_state_dict(convert_hook_spectral_norm_state_dict(state, ours))
    ours.eval()
    assert_close(ours(x), old(x), rtol=1e-5, atol=1e-6)
    # Training continues the power iteration; the hook updated v then u, the parametrization u then
    # v, so this one iteration differs by ~1e-4 (both converge to the same singular vectors).
    ours.train(), old.train()
    assert_close(ours(x), old(x), rtol=1e-3, atol=1e-4)


def test_readme_porting_example_runs():
    """The README's porting section: its example converts and loads a hook-API state dict."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Porting a SAGAN"):]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    assert "parametrizations.weight.original" in str(list(namespace["D"].state_dict()))
