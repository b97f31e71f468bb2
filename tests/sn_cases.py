"""Shared by the spectral-norm update tests and the port of torch's spectral-norm tests: the
backends to run on, small SN models with a clear spectral gap, every torch.optim optimizer form.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch
from torch import nn

from sagan_fast.nn import SNConv2d, SNConvTranspose2d, SNLinear, spectral_norm_update_counts
from sagan_fast.ops import reference
from sagan_fast.ops._backend import why_unavailable

_triton_reason = ("needs CUDA or TRITON_INTERPRET=1"
                  if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1") else None)
_cuda_reason = why_unavailable("cuda", torch.device("cpu"), "spectral_norm_normalize")

AVAILABLE_BACKENDS = ["reference"] + (["triton"] if _triton_reason is None else []) + \
    (["cuda"] if _cuda_reason is None else [])
# Every backend: the reference; Triton (in its interpreter on a CPU); cuda = the extension's C++
# CPU ops here, its CUDA kernels on a GPU.
BACKENDS = [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(_triton_reason is not None, reason=str(_triton_reason))),
    pytest.param("cuda", marks=pytest.mark.skipif(_cuda_reason is not None, reason=str(_cuda_reason))),
]


def sn_model(backend: str | None, *, linear_only: bool = False, seed: int = 0,
             torch_sn: bool = False) -> nn.Module:
    """Three SN layers (conv, transposed conv: dim 1, linear), 4x4x3 input -> 8 outputs; or two
    bias-free linears (``linear_only``: Muon takes 2-D parameters only). ``torch_sn``: the same
    model (same draws) with torch's parametrization instead of ours."""
    torch.manual_seed(seed)
    tsn = nn.utils.parametrizations.spectral_norm

    def make(ours, plain, *args, **kwargs):
        return tsn(plain(*args, **kwargs)) if torch_sn else ours(*args, backend=backend, **kwargs)
    if linear_only:
        return nn.Sequential(nn.Flatten(), make(SNLinear, nn.Linear, 48, 24, bias=False), nn.Tanh(),
                             make(SNLinear, nn.Linear, 24, 8, bias=False))
    return nn.Sequential(make(SNConv2d, nn.Conv2d, 3, 8, 3, padding=1), nn.Tanh(),
                         make(SNConvTranspose2d, nn.ConvTranspose2d, 8, 4, 4, stride=2, padding=1), nn.Tanh(),
                         nn.Flatten(), make(SNLinear, nn.Linear, 4 * 8 * 8, 8))


def sn_weights(model: nn.Module):
    """(raw weight, SN dim) of every 2+-D spectrally normalized weight, ours or torch's."""
    for m in model.modules():
        if hasattr(m, "parametrizations"):
            plist = m.parametrizations.weight
            if plist.original.ndim > 1:
                yield plist.original, plist[0].dim


@torch.no_grad()
def give_spectral_gap_(model: nn.Module, seed: int = 1) -> None:
    """Each SN weight := a unit rank-one matrix + small noise (top singular value ~1, the next
    ~0.3): one power iteration per update tracks it closely, so after training the largest
    singular value of W_sn is 1 to ~1e-4, and a skipped update shows as a value far from 1.
    Written with copy_ (autograd sees it): the next training forward iterates once, as torch's."""
    g = torch.Generator().manual_seed(seed)
    for w, dim in sn_weights(model):
        rows, cols = reference.weight_to_matrix(w, dim).shape
        a = torch.randn(rows, generator=g, dtype=torch.float64)
        b = torch.randn(cols, generator=g, dtype=torch.float64)
        mat = torch.outer(a / a.norm(), b / b.norm())
        mat += 0.25 * torch.randn(rows, cols, generator=g, dtype=torch.float64) / (rows ** 0.5 + cols ** 0.5)
        w.copy_(reference.matrix_to_weight_shape(mat, w.shape, dim).to(w.dtype))


@torch.no_grad()
def next_forward_sigmas(model: nn.Module) -> list[float]:
    """Largest singular value of the W_sn each SN layer's next training forward uses (float64 SVD of
    ``module.weight`` read in training mode: an update due then happens then)."""
    out = []
    for m in model.modules():
        if hasattr(m, "parametrizations"):
            plist = m.parametrizations.weight
            if plist.original.ndim > 1:
                mat = reference.weight_to_matrix(m.weight.double(), plist[0].dim)
                out.append(float(torch.linalg.matrix_norm(mat, ord=2)))
    return out


def update_counts(model: nn.Module) -> list[int]:
    return list(spectral_norm_update_counts(model).values())


# --- every torch.optim optimizer, in each form torch offers on the device ------------------------

LEARNING_RATES = dict(SGD=0.05, Adam=1e-2, AdamW=1e-2, NAdam=1e-2, RAdam=3e-3, Adamax=1e-2, Adagrad=0.05,
                      Adadelta=1.0, RMSprop=3e-3, Rprop=1e-2, ASGD=0.02, Adafactor=3e-3, Muon=5e-3, LBFGS=0.1)
# Not run: SparseAdam (sparse gradients only; a spectrally normalized weight's gradient is dense).
SKIPPED_OPTIMIZERS = {"SparseAdam": "needs sparse gradients; an SN weight's gradient is dense"}


def _supports_fused(cls, device: str) -> bool:
    if "fused" not in inspect.signature(cls.__init__).parameters:
        return False
    p = nn.Parameter(torch.zeros(2, 2, device=device))
    p.grad = torch.zeros_like(p)
    try:
        cls([p], lr=0.1, fused=True).step()
    except (RuntimeError, ValueError, TypeError, AssertionError):
        return False
    return True


def optimizer_forms(device: str = "cpu") -> list[tuple[str, str]]:
    """(optimizer name, form): "for-loop" / "foreach" / "fused" where torch offers the keyword
    (fused: where it runs on ``device``), else "default"."""
    forms = []
    for name in LEARNING_RATES:
        cls = getattr(torch.optim, name, None)
        if cls is None:  # Muon is new in torch 2.9
            continue
        params = inspect.signature(cls.__init__).parameters
        if "foreach" in params:
            forms += [(name, "for-loop"), (name, "foreach")]
            if _supports_fused(cls, device):
                forms.append((name, "fused"))
        else:
            forms.append((name, "default"))
    return forms


def make_optimizer(name: str, form: str, params, **extra) -> torch.optim.Optimizer:
    kwargs = dict(lr=LEARNING_RATES[name], **extra)
    if form == "for-loop":
        kwargs["foreach"] = False
    elif form == "foreach":
        kwargs["foreach"] = True
    elif form == "fused":
        kwargs["fused"] = True
    if name == "SGD":
        kwargs.setdefault("momentum", 0.9)
    if name == "LBFGS":
        kwargs["max_iter"] = 1  # one weight update per step (more: one per inner iteration)
    return getattr(torch.optim, name)(params, **kwargs)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, device: str = "cpu") -> None:
    """``steps`` of a regression to a fixed target, each a forward, a backward and opt.step()."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 4, 4, generator=g).to(device)
    y = torch.randn(4, 8, generator=g).to(device)

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss
    for _ in range(steps):
        if isinstance(opt, torch.optim.LBFGS):
            opt.step(closure)
        else:
            closure()
            opt.step()
