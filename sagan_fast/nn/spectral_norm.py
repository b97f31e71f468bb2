"""Drop-in spectral norm: torch's API and state-dict keys, with the power iteration fused and run
once per weight update instead of once per forward call.

``spectral_norm(module)`` registers a parametrization exactly where torch's does, so a module
carries ``parametrizations.weight.original``, ``parametrizations.weight.0._u`` and ``..._v``: a state
dict saved with either implementation loads into the other and gives the same normalized weight.

What differs from torch, on purpose:

- u and v are updated (one power iteration, in place, under no_grad) only when the weight has
  changed since the last update (its autograd version counter moved: an optimizer step, a
  ``load_state_dict``, a DDP broadcast). Every forward in between reuses them. So D on real and
  then on fake before one backward, or G under no_grad and then with grad, all see the same
  normalized weight, and nothing saved for backward is modified in place.
- The update runs outside any compiled graph (``torch.compiler.disable``), so ``torch.compile``
  of a whole GAN step works; the normalization itself is an op registered with torch.library.
- :func:`fuse_spectral_norms` makes a model update all of its stale SN weights together, in one
  multi-tensor launch, before its forward; in eager mode it also computes every layer's
  W / sigma at once (triton: one launch forward, two backward, for the whole model), which the
  layers use during that forward. Under torch.compile, and for a layer called on its own, each
  layer normalizes its own weight (one launch forward, two backward on triton).
- Which layers: every parametrization whose weight has 2+ dims; 1-D weights are normalized
  exactly by their own forward, as torch. Non-contiguous weights (channels_last convs) work, at
  the cost of a contiguous copy, and leave the model-level normalize to the per-layer path.

Zero, NaN and Inf weights: eps floors the norms, as torch, so a zero weight gives sigma = 0; the
update checks every sigma it computes is finite and positive (one device sync per update, for all
weights of a model at once) and raises :class:`SpectralNormError` naming the weight otherwise.

Skipping that sync (a training loop that wants no host sync per step): call
``set_check_finite(False)`` once (process-wide default for every update, fused or per-layer), or
pass ``check_finite=False`` to :func:`update_spectral_norms`; then call
:func:`check_spectral_norms` (one sync for the whole model) where a sync is paid anyway, e.g. at
log steps. A degenerate weight is then reported at the next check instead of at once; in between
its layer outputs NaN/Inf.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..ops import reference
from ..ops._backend import accumulation_dtype
from ..ops.spectral_norm import (spectral_norm_normalize, spectral_norm_normalize_multi,
                                 spectral_norm_power_iteration_, spectral_norm_sigma)


class SpectralNormError(FloatingPointError):
    """A spectral norm update found a zero, NaN or Inf sigma: the weight is degenerate."""


_CHECK_FINITE = True


def set_check_finite(enabled: bool) -> bool:
    """Process-wide default: check sigmas at every update (one sync each; default True).

    Returns the previous setting. With False, call :func:`check_spectral_norms` at log steps.
    """
    global _CHECK_FINITE
    previous, _CHECK_FINITE = _CHECK_FINITE, bool(enabled)
    return previous


def check_finite_enabled() -> bool:
    return _CHECK_FINITE


class SpectralNorm(nn.Module):
    """The parametrization registered by :func:`spectral_norm` (mirrors torch's ``_SpectralNorm``)."""

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, dim: int = 0,
                 eps: float = 1e-12, backend: str | None = None) -> None:
        super().__init__()
        ndim = weight.ndim
        if dim >= ndim or dim < -ndim:
            raise IndexError(f"Dimension out of range (expected to be in range of [-{ndim}, {ndim - 1}] "
                             f"but got {dim})")
        if n_power_iterations <= 0:
            raise ValueError(f"Expected n_power_iterations to be positive, but got "
                             f"n_power_iterations={n_power_iterations}")
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps = eps
        self.n_power_iterations = n_power_iterations
        self.backend = backend
        # Version of the weight that u, v and _sigma belong to; -1: never updated, so the first
        # training forward runs one power iteration, exactly as torch's first forward does.
        self._seen_version = -1
        self._seen_data_ptr = 0
        # True when a model-level pre-hook (fuse_spectral_norms) keeps this layer up to date.
        self._fused = False
        # W_sn computed by the model-level pre-hook for the current model forward (one launch for
        # all layers), with the weight version and grad mode it is valid for; cleared after it.
        self._w_sn_stash: tuple[torch.Tensor, int, int, bool] | None = None
        if ndim > 1:
            weight_mat = reference.weight_to_matrix(weight.detach(), self.dim)
            h, w = weight_mat.shape
            # Same random draws and 15 warm-up iterations as torch, so one seed gives one u, v.
            u = weight_mat.new_empty(h).normal_(0, 1)
            v = weight_mat.new_empty(w).normal_(0, 1)
            u = F.normalize(u, dim=0, eps=eps)
            v = F.normalize(v, dim=0, eps=eps)
            u, v = reference.spectral_norm_power_iteration(weight_mat, u, v, 15, eps)
            self.register_buffer("_u", u)
            self.register_buffer("_v", v)
            # sigma = u . W v for the version in _seen_version; not in the state dict (torch has none).
            self.register_buffer("_sigma", torch.ones((), device=weight.device,
                                                       dtype=accumulation_dtype(weight.dtype)),
                                 persistent=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_power_iterations={self.n_power_iterations}, eps={self.eps}"

    def is_stale(self, weight: torch.Tensor) -> bool:
        return weight._version != self._seen_version or weight.data_ptr() != self._seen_data_ptr

    def mark_fresh(self, weight: torch.Tensor) -> None:
        # plain ints: skip nn.Module.__setattr__ (host time on every update of every layer)
        object.__setattr__(self, "_seen_version", weight._version)
        object.__setattr__(self, "_seen_data_ptr", weight.data_ptr())

    @torch.compiler.disable
    def _update_if_stale(self, weight: torch.Tensor) -> None:
        if self.is_stale(weight):
            _power_iterate([(self, weight)], check_finite=None)

    def _stashed(self, weight: torch.Tensor) -> torch.Tensor | None:
        stash = self._w_sn_stash
        if stash is None or torch.compiler.is_compiling():
            return None
        w_sn, version, ptr, grad_mode = stash
        if version != weight._version or ptr != weight.data_ptr() or grad_mode != torch.is_grad_enabled():
            return None
        return w_sn

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        if self.training:
            w_sn = self._stashed(weight)
            if w_sn is not None:
                return w_sn
            # Fused layers were updated by their model's pre-hook; skipping the check keeps the
            # compiled graph free of breaks. Eager layers check their weight's version (cheap).
            if not (self._fused and torch.compiler.is_compiling()):
                self._update_if_stale(weight)
            sigma = self._sigma
        else:
            sigma = spectral_norm_sigma(weight.detach(), self._u, self._v, self.dim)
        return spectral_norm_normalize(weight, self._u, self._v, sigma, dim=self.dim, backend=self.backend)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        # Assigning module.weight = W stores W itself, as torch does.
        return value


def _raise_if_degenerate(sigmas: torch.Tensor, shapes: list[tuple]) -> None:
    if sigmas.device.type == "meta":  # shapes only (e.g. a model built to list its layers)
        return
    bad = ~(torch.isfinite(sigmas) & (sigmas > 0))
    if bool(bad.any()):  # the one sync
        shapes = [shapes[i] for i in bad.nonzero().flatten().tolist()]
        raise SpectralNormError(
            f"spectral norm: sigma is zero, NaN or Inf for weight(s) of shape {shapes} "
            "(the weight is all zero or holds NaN/Inf); the normalized weight would be "
            "NaN. Check the learning rate / loss for divergence, or re-initialize the layer.")


def _power_iterate(pairs: list[tuple[SpectralNorm, torch.Tensor]], check_finite: bool | None) -> None:
    """One multi-tensor power iteration per (device, dtype, n_iter, eps, backend) group."""
    if check_finite is None:
        check_finite = _CHECK_FINITE
    groups: dict[tuple, list[tuple[SpectralNorm, torch.Tensor]]] = {}
    for sn, weight in pairs:
        key = (weight.device, weight.dtype, sn.n_power_iterations, sn.eps, sn.backend)
        groups.setdefault(key, []).append((sn, weight))
    for (_, _, n_iter, eps, backend), members in groups.items():
        with torch.no_grad():
            sigmas = spectral_norm_power_iteration_(
                [w.detach() for _, w in members], [sn._u for sn, _ in members],
                [sn._v for sn, _ in members], [sn.dim for sn, _ in members],
                n_power_iterations=n_iter, eps=eps, backend=backend)
            if check_finite:
                _raise_if_degenerate(sigmas, [tuple(w.shape) for _, w in members])
            buffers = [sn._sigma for sn, _ in members]
            if all(b.dtype == sigmas.dtype for b in buffers):
                torch._foreach_copy_(buffers, list(sigmas.unbind(0)))  # one launch, not one per layer
            else:
                for b, s in zip(buffers, sigmas.unbind(0)):
                    b.copy_(s)
            for sn, w in members:
                sn.mark_fresh(w)


def spectral_norm_layers(modules: nn.Module | Iterable[nn.Module]):
    """Yield (parametrization, weight Parameter) for every :class:`SpectralNorm` in ``modules``.

    Only parametrizations that see the raw parameter (first in their list) are yielded; others
    update themselves in their own forward.
    """
    if isinstance(modules, nn.Module):
        modules = modules.modules()
    for m in modules:
        if not parametrize.is_parametrized(m):
            continue
        for plist in m.parametrizations.values():
            first = plist[0]
            if isinstance(first, SpectralNorm) and plist.original.ndim > 1:
                yield first, plist.original


@torch.compiler.disable
def update_spectral_norms(model: nn.Module | Iterable[nn.Module], *, force: bool = False,
                          check_finite: bool | None = None) -> int:
    """Power-iterate every stale SN weight of ``model`` in one multi-tensor launch per group.

    Only layers in training mode whose weight changed since their last update (or all, with
    ``force``) are updated. Returns how many weights were updated. ``check_finite``: raise
    :class:`SpectralNormError` on a degenerate sigma (one sync); None: :func:`set_check_finite`'s
    setting.
    """
    return _update_layers(spectral_norm_layers(model), force, check_finite)


def _update_layers(layers, force: bool, check_finite: bool | None) -> int:
    pairs = [(sn, w) for sn, w in layers if sn.training and (force or sn.is_stale(w))]
    if pairs:
        _power_iterate(pairs, check_finite)
    return len(pairs)


@torch.compiler.disable
def check_spectral_norms(model: nn.Module | Iterable[nn.Module]) -> None:
    """Raise :class:`SpectralNormError` if any SN weight of ``model`` has a zero, NaN or Inf sigma.

    Looks at the sigmas of the last updates (one device sync for the whole model): the check to
    run at log steps after ``set_check_finite(False)``.
    """
    layers = list(spectral_norm_layers(model))
    by_device: dict[torch.device, list[tuple[SpectralNorm, torch.Tensor]]] = {}
    for sn, w in layers:
        by_device.setdefault(sn._sigma.device, []).append((sn, w))
    for members in by_device.values():
        sigmas = torch.stack([sn._sigma.to(torch.float64) for sn, _ in members])
        _raise_if_degenerate(sigmas, [tuple(w.shape) for _, w in members])


def _fused_layers(model: nn.Module) -> list[tuple[SpectralNorm, torch.Tensor]]:
    """The SN layers listed by :func:`fuse_spectral_norms` (walking the module tree at every
    forward costs more host time than the kernels)."""
    layers = getattr(model, "_sagan_fast_sn_layers", None)
    return layers if layers is not None else list(spectral_norm_layers(model))


@torch.compiler.disable
def _normalize_all(model: nn.Module) -> None:
    """W_sn of every training-mode SN layer of ``model`` at once (one launch per group on triton),
    stashed on the layers for this forward."""
    groups: dict[tuple, list[tuple[SpectralNorm, torch.Tensor]]] = {}
    for sn, w in _fused_layers(model):
        if sn.training:
            groups.setdefault((w.device, sn.backend), []).append((sn, w))
    grad_mode = torch.is_grad_enabled()
    for (_, backend), members in groups.items():
        w_sns = spectral_norm_normalize_multi(
            [w for _, w in members], [sn._u for sn, _ in members], [sn._v for sn, _ in members],
            [sn._sigma for sn, _ in members], [sn.dim for sn, _ in members], backend=backend)
        for (sn, w), w_sn in zip(members, w_sns):
            sn._w_sn_stash = (w_sn, w._version, w.data_ptr(), grad_mode)


def _clear_stashes(model: nn.Module) -> None:
    for sn, _ in _fused_layers(model):
        sn._w_sn_stash = None


@torch.compiler.disable
def _fused_update(model: nn.Module) -> None:
    _update_layers(_fused_layers(model), False, None)


def _fused_pre_hook(module: nn.Module, args) -> None:
    if module.training:
        _fused_update(module)
        if getattr(module, "_sagan_fast_sn_normalize_all", False) and not torch.compiler.is_compiling():
            _normalize_all(module)


def _fused_post_hook(module: nn.Module, args, output) -> None:
    if getattr(module, "_sagan_fast_sn_normalize_all", False) and not torch.compiler.is_compiling():
        _clear_stashes(module)


def fuse_spectral_norms(model: nn.Module, *, normalize_all: bool = True) -> nn.Module:
    """Update all SN weights of ``model`` together, once per weight update, before its forward.

    Installs forward hooks on ``model`` (idempotent). With ``normalize_all`` (eager mode only),
    the pre-hook also computes every layer's W / sigma at once (one launch on the triton backend,
    and one multi-tensor backward) and the layers use it during this forward; under
    torch.compile, and for a layer called outside the model's forward, each layer normalizes its
    own weight. The layers keep working alone too. The list of SN layers is taken now: call
    again after adding or removing SN layers.

    Trade-off of ``normalize_all``: the model-level backward runs once every W_sn gradient has
    arrived, i.e. at the end of the model's backward, so under DDP the SN weights' gradients are
    all ready at the end instead of layer by layer (less all-reduce / backward overlap). Pass
    ``normalize_all=False`` to keep per-layer backward there if the bench says it is faster.
    """
    layers = list(spectral_norm_layers(model))
    for sn, _ in layers:
        sn._fused = True
    model._sagan_fast_sn_layers = layers
    model._sagan_fast_sn_normalize_all = bool(normalize_all)
    if not getattr(model, "_sagan_fast_sn_fused", False):
        model.register_forward_pre_hook(_fused_pre_hook)
        model.register_forward_hook(_fused_post_hook, always_call=True)
        model._sagan_fast_sn_fused = True
    return model


# --- public state: what checkpoints, training steps and benchmarks read or restore -------------

def _layers_by_name(model: nn.Module):
    """(qualified name of the parametrization, SpectralNorm, raw weight) for our SN layers."""
    for name, module in model.named_modules():
        if isinstance(module, SpectralNorm) and hasattr(module, "_u"):
            plist = model.get_submodule(name.rsplit(".", 1)[0])
            yield name, module, plist.original


def spectral_norm_state(model: nn.Module) -> dict[str, dict]:
    """What the module state dict does not hold, per SN layer of ours (keyed by its module name):
    the last sigma and whether u, v are up to date for the current weight.

    Restoring both with :func:`load_spectral_norm_state` makes a resumed run do exactly the power
    iterations the uninterrupted run does (none extra after loading), so resuming is bit-exact.
    """
    return {name: {"sigma": sn._sigma.detach().clone(), "fresh": not sn.is_stale(weight)}
            for name, sn, weight in _layers_by_name(model)}


def load_spectral_norm_state(model: nn.Module, state: dict[str, dict]) -> None:
    """Restore :func:`spectral_norm_state`; call after ``model.load_state_dict`` (which wrote the
    weights, so every layer looks changed). A layer missing from ``state`` is a ``KeyError``."""
    for name, sn, weight in _layers_by_name(model):
        if name not in state:
            raise KeyError(f"checkpoint has no spectral norm state for {name!r}")
        with torch.no_grad():
            sn._sigma.copy_(state[name]["sigma"])
        if state[name]["fresh"]:
            sn.mark_fresh(weight)
        else:
            object.__setattr__(sn, "_seen_version", -1)


def mark_weights_changed(models: nn.Module | Iterable[nn.Module]) -> int:
    """Declare that the SN weights of ``models`` (a model or several, searched recursively) changed
    in a way autograd cannot see (a write through ``.data``, from C++, from another process, a CUDA
    graph replay): the next training-mode forward of each runs its power iteration. Returns how many
    layers were marked."""
    count = 0
    for model in ([models] if isinstance(models, nn.Module) else list(models)):
        for sn, _ in spectral_norm_layers(model):
            object.__setattr__(sn, "_seen_version", -1)
            count += 1
    return count


@torch.no_grad()
def spectral_norm_sigmas(model: nn.Module) -> torch.Tensor:
    """sigma = u . W v of every spectrally normalized weight of ``model`` from its stored u, v
    (ours or torch's parametrization), float32, in module order; empty when there is none."""
    sigmas = []
    for m in model.modules():
        if not parametrize.is_parametrized(m):
            continue
        for plist in m.parametrizations.values():
            sn = plist[0]
            if hasattr(sn, "_u") and hasattr(sn, "_v") and plist.original.ndim > 1:
                sigmas.append(spectral_norm_sigma(plist.original.detach(), sn._u, sn._v,
                                                  getattr(sn, "dim", 0)).float().reshape(()))
    return torch.stack(sigmas) if sigmas else torch.zeros(0)


@torch.no_grad()
def normalized_sigmas(model: nn.Module) -> dict[str, float]:
    """The exact largest singular value of W / (u . W v) for every spectrally normalized weight of
    ``model`` (ours or torch's parametrization), from the stored u, v, without updating them.

    ~1 when spectral norm really normalized the weight the next forward uses; far from 1 when
    the power iteration was skipped after the weight changed. Keyed by the parametrized module's
    name. An SVD per layer: for checks at the end of a run or a benchmark, not for every step.
    """
    out = {}
    for name, m in model.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        for pname, plist in m.parametrizations.items():
            sn = plist[0]
            if not (hasattr(sn, "_u") and hasattr(sn, "_v") and plist.original.ndim > 1):
                continue
            mat = reference.weight_to_matrix(plist.original.detach(), getattr(sn, "dim", 0))
            dtype = torch.promote_types(mat.dtype, torch.float64)
            mat = mat.to(dtype)
            sigma = reference.spectral_norm_sigma(mat, sn._u.to(dtype), sn._v.to(dtype))
            key = f"{name}.{pname}" if name else pname
            out[key] = float(torch.linalg.matrix_norm(mat / sigma, ord=2).abs().cpu())
    return out


def assert_normalized(models: nn.Module | Iterable[nn.Module], tol: float = 0.02) -> None:
    """Raise :class:`SpectralNormError` unless every SN weight's :func:`normalized_sigmas` is within
    ``tol`` (relative) of 1: what every benchmark checks after timing a training step."""
    bad = {}
    for i, model in enumerate([models] if isinstance(models, nn.Module) else list(models)):
        for name, s in normalized_sigmas(model).items():
            if not abs(s - 1.0) <= tol:
                bad[f"model{i}:{name}"] = round(s, 4)
    if bad:
        raise SpectralNormError(f"spectral norm did not normalize {len(bad)} weight(s) (largest singular "
                                f"value of W_sn, expected 1 +- {tol}): {bad}")


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1,
                  eps: float = 1e-12, dim: int | None = None, *, backend: str | None = None) -> nn.Module:
    """Spectral normalization of ``module.<name>``: torch's signature and state-dict keys.

    ``dim`` defaults to 1 for transposed convolutions and 0 otherwise. ``backend`` picks the
    kernels (``None``: the ``SAGAN_FAST_BACKEND`` environment variable, default ``auto``).
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if dim is None:
        dim = reference.default_spectral_norm_dim(module)
    sn = SpectralNorm(weight, n_power_iterations, dim, eps, backend=backend)
    # register_parametrization evaluates the parametrization once (a training-mode forward, so one
    # power iteration, as torch's does too); the first real forward must iterate again, as torch's.
    parametrize.register_parametrization(module, name, sn)
    sn._seen_version = -1
    return module
