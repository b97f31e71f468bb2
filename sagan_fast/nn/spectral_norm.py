"""Drop-in spectral norm: torch's API and state-dict keys, with the power iteration fused and run
once per weight update instead of once per forward call.

``spectral_norm(module)`` registers a parametrization exactly where torch's does, so a module
carries ``parametrizations.weight.original``, ``parametrizations.weight.0._u`` and ``..._v``: a state
dict saved with either implementation loads into the other and gives the same normalized weight.

When u and v are updated (one power iteration, in place, under no_grad), exactly once per change
of the weight, by two mechanisms:

1. **Optimizer steps: a global optimizer-step post-hook**
   (``torch.optim.optimizer.register_optimizer_step_post_hook``, which fires for every
   ``torch.optim.Optimizer`` subclass). After any ``optimizer.step()``, every parameter of that
   optimizer that is the raw weight of one of our SN layers and has a gradient (optimizers skip
   the others) gets its power iteration right there, all of them in one multi-tensor launch per
   group; layers in eval mode are only marked stale. Version counters are not needed for this, so
   optimizers that do not bump them (``fused=True`` Adam, AdamW, SGD, Adagrad) are seen like the
   others, and so are capturable optimizers inside a CUDA graph: the hook runs while the step is
   captured, so the power-iteration kernels are captured right after the optimizer's and every
   replay runs them exactly once per update (no finite check while capturing: it would sync).
   Inside ``torch.compile`` the hook runs eagerly after the compiled optimizer step (a graph
   break there). The parameter -> layer map is cached per optimizer and re-checked by identity
   every step (``module.to()`` keeps the Parameter object; a new object - ``swap_tensors``, a
   re-registered ``original``, a deepcopy - is re-mapped; a weight tied into several layers
   updates all of them). Host cost: a few microseconds per SN layer per step (bench/spectral_norm.py
   ``--hook-cost``), plus the launches of the update itself.
2. **Every other write** (``torch.no_grad()`` updates, ``copy_``, ``load_state_dict``, ``lerp_`` /
   EMA, ``.to()`` / ``.double()``, DDP's initial broadcast): the weight's autograd version counter,
   data pointer, dtype and device, compared lazily before the next training-mode forward.

What neither can see - a write through ``.data``, from C++ or from another process - needs one
call: :func:`mark_weights_changed` (the next training forward then runs the power iteration).
Until then the layer keeps its u, v, and every backend normalizes the written weight by its own
u . W v with those u, v: no backend divides a weight by a sigma computed from another weight.

Checking a training loop: a power iteration ends with v = normalize(W^H u), so
:func:`power_iteration_residuals` is 0 (up to rounding) for every layer whose u, v were computed
from its current weight, and not for a layer whose update was skipped or whose weight was written
through ``.data`` without the call; :func:`assert_normalized`, which every benchmark runs at its
end, checks that and the largest singular value of every W_sn.

Every forward between two updates reuses u and v: D on real and then on fake before one backward,
or G under no_grad and then with grad, all see the same normalized weight, and nothing saved for
backward is modified in place.

torch.compile: an unfused layer's training forward calls one custom op
(``sagan_fast_nn::refresh_power_iteration_``, mutating u, v) whose Python implementation runs at
run time, checks the real weight for changes and iterates if needed; the normalization is an op
too. So unfused SN layers trace with no graph break and no recompile per layer shape. The op is
tagged ``cudagraph_unsafe`` (Inductor's CUDA graphs split around it instead of freezing its
decision).

:func:`fuse_spectral_norms` makes a model update all of its stale SN weights together, in one
multi-tensor launch, before its forward (a forward pre-hook, eager: one graph break at the model's
entry under torch.compile); in eager mode it also computes every layer's W / sigma at once (triton:
two launches forward, two backward, for the whole model), which the layers use during that
forward. Under torch.compile, and for a layer called on its own, each layer normalizes its own
weight; a fused layer called on its own *inside a compiled region* trusts its model's last check
(the optimizer hook still updates it; after another kind of write call
:func:`update_spectral_norms` on the model). Which layers: every parametrization whose weight has
2+ dims; 1-D weights are normalized exactly by their own forward, as torch. Non-contiguous weights
(channels_last convs) work, at the cost of a contiguous copy, and leave the model-level normalize to
the per-layer path. Complex weights work as in torch (sigma = u^H W v), on the reference backend.

Autocast: a layer whose module autocast runs in lower precision (convolutions, linear layers;
not embeddings) gets its W_sn straight in the autocast dtype when autocast is on for the weight's
device (the triton backend writes it from the fp32 master weight in the same pass that divides
by sigma; the others cast), so F.conv2d / F.linear find nothing left to cast; the weight, u, v
and sigma keep their dtypes and the gradient reaches the weight in its own dtype. ``module.weight``
read under autocast is then a 16-bit tensor, exactly what the module's own op would have cast it
to; outside autocast nothing changes.

Zero, NaN and Inf weights: eps floors the norms, as torch, so a zero weight gives sigma = 0; the
update checks every sigma it computes is finite and nonzero (one device sync per update, for all
weights of a group at once) and raises :class:`SpectralNormError` naming the weight otherwise.

Skipping that sync (a training loop that wants no host sync per step): call
``set_check_finite(False)`` once (process-wide default for every update, fused or per-layer), or
pass ``check_finite=False`` to :func:`update_spectral_norms`; then call
:func:`check_spectral_norms` (one sync for the whole model) where a sync is paid anyway, e.g. at
log steps. A degenerate weight is then reported at the next check instead of at once; in between
its layer outputs NaN/Inf.
"""

from __future__ import annotations

import inspect
import itertools
import weakref
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..ops import reference
from ..ops._backend import accumulation_dtype
from ..ops.spectral_norm import (autocast_dtype, check_spectral_norm_inputs, power_iteration_checked_,
                                 spectral_norm_normalize, spectral_norm_normalize_multi, spectral_norm_sigma)


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


# --- which layers exist: for the optimizer hook (parameter -> layer) and the compile op (id -> layer)

# Live layers by id; entries leave with their layer (weakref callback).
_LAYERS: dict[int, weakref.ref] = {}
_NEXT_ID = itertools.count()
# Bumped whenever a layer appears (created, copied, unpickled) or a raw weight object is new:
# the per-optimizer parameter -> layer maps are rebuilt then.
_GENERATION = 0


def _bump_generation() -> None:
    global _GENERATION
    _GENERATION += 1


def _weight_key(weight: torch.Tensor) -> tuple:
    """What identifies one value of a weight: autograd version, storage address, dtype, device."""
    return (weight._version, weight.data_ptr(), weight.dtype, weight.device)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


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
        # Plain attributes (no nn.Module bookkeeping, no state dict):
        # _seen: _weight_key of the weight that u, v belong to; None: never updated or
        # marked changed, so the next training forward runs one power iteration (as torch's does).
        # _plist: the ParametrizationList whose `original` this layer normalizes (set by
        # spectral_norm(); None for a layer that is not first in its list or registered by hand).
        # _weight_ref: the raw weight seen by the forward when _plist is unknown.
        # _fused: a model-level pre-hook (fuse_spectral_norms) keeps this layer up to date.
        # _w_sn_stash: W_sn computed by that pre-hook for the current model forward (one launch
        # for all layers), with the weight key and grad mode it is valid for; cleared after it.
        # _n_updates: power-iteration updates run on the host (spectral_norm_update_counts).
        # _checked: identity of (weight storage, u, v) at the last full input check.
        # _autocast_output: the module's op runs in the autocast dtype (conv, linear; set by
        # spectral_norm()), so W_sn is written in that dtype when autocast is on.
        for name, value in (("_seen", None), ("_plist", None), ("_weight_ref", None), ("_fused", False),
                            ("_w_sn_stash", None), ("_n_updates", 0), ("_checked", None),
                            ("_autocast_output", False)):
            object.__setattr__(self, name, value)
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
            # sigma = u . W v of the last power iteration, as (sigmas of its group, index): kept by
            # reference, not copied per layer per step; not in the state dict (torch has none).
            object.__setattr__(self, "_last_sigma", (torch.ones(1, device=weight.device,
                                                                dtype=accumulation_dtype(weight.dtype)), 0))
        self._register()

    def _register(self) -> None:
        layer_id = next(_NEXT_ID)
        object.__setattr__(self, "_layer_id", layer_id)
        _LAYERS[layer_id] = weakref.ref(self, lambda _, i=layer_id: _LAYERS.pop(i, None))
        _bump_generation()

    def __setstate__(self, state) -> None:
        # copy.deepcopy and unpickling: a new layer (new id), whose weight is a new tensor.
        super().__setstate__(state)
        object.__setattr__(self, "_seen", None)
        object.__setattr__(self, "_w_sn_stash", None)
        object.__setattr__(self, "_weight_ref", None)
        self._register()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_power_iterations={self.n_power_iterations}, eps={self.eps}"

    def is_stale(self, weight: torch.Tensor) -> bool:
        return self._seen != _weight_key(weight)

    def mark_fresh(self, weight: torch.Tensor) -> None:
        object.__setattr__(self, "_seen", _weight_key(weight))

    def mark_stale(self) -> None:
        object.__setattr__(self, "_seen", None)

    def _stashed(self, weight: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor | None:
        stash = self._w_sn_stash
        if stash is None:
            return None
        w_sn, key, grad_mode, stash_dtype = stash
        if key != _weight_key(weight) or grad_mode != torch.is_grad_enabled() or stash_dtype != out_dtype:
            return None
        return w_sn

    def _output_dtype(self, weight: torch.Tensor) -> torch.dtype | None:
        """The autocast dtype W_sn is written in, or None (the weight's): only for layers whose op
        autocast casts, and only for the dtypes autocast casts (floating, not float64)."""
        if not getattr(self, "_autocast_output", False):
            return None
        target = autocast_dtype(weight.device.type)
        if target is None or weight.dtype == target or weight.dtype not in (torch.float32, torch.float16,
                                                                            torch.bfloat16):
            return None
        return target

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        u, v = self._u, self._v
        out_dtype = self._output_dtype(weight)
        if self.training:
            if torch.compiler.is_compiling():
                # Fused layers were updated by their model's pre-hook, outside the graph. The others
                # check their weight at run time, inside the graph: no break, no recompile.
                if not self._fused:
                    _refresh_op(weight.detach(), u, v, self._layer_id)
            else:
                w_sn = self._stashed(weight, out_dtype)
                if w_sn is not None:
                    return w_sn
                if self._plist is None:
                    self._remember_weight(weight)
                if self._seen != _weight_key(weight):
                    _power_iterate([(self, weight, u, v)], None)
        return spectral_norm_normalize(weight, u, v, dim=self.dim, backend=self.backend, out_dtype=out_dtype)

    def _remember_weight(self, weight: torch.Tensor) -> None:
        ref = self._weight_ref
        if ref is None or ref() is not weight:
            object.__setattr__(self, "_weight_ref", weakref.ref(weight))
            _bump_generation()

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        # Assigning module.weight = W stores W itself, as torch does.
        return value


def _raw_weight(sn: SpectralNorm) -> torch.Tensor | None:
    """The tensor ``sn`` normalizes now (its ParametrizationList's ``original``), or None."""
    plist = sn._plist
    if plist is not None:
        weight = plist._parameters.get("original")
        return weight if weight is not None else plist._buffers.get("original")
    ref = sn._weight_ref
    return ref() if ref is not None else None


def _layer_by_id(layer_id: int) -> SpectralNorm:
    ref = _LAYERS.get(layer_id)
    layer = ref() if ref is not None else None
    if layer is None:
        raise RuntimeError(f"spectral norm: layer {layer_id} no longer exists (a compiled graph outlived "
                           "its model); recompile after rebuilding the model")
    return layer


# --- the power iteration ---------------------------------------------------------------------

def _raise_if_degenerate(sigmas: torch.Tensor, shapes: list[tuple]) -> None:
    if sigmas.device.type == "meta":  # shapes only (e.g. a model built to list its layers)
        return
    magnitude = sigmas.abs() if sigmas.is_complex() else sigmas
    bad = ~(torch.isfinite(magnitude) & (magnitude > 0))
    if bool(bad.any()):  # the one sync
        shapes = [shapes[i] for i in bad.nonzero().flatten().tolist()]
        raise SpectralNormError(
            f"spectral norm: sigma is zero, NaN or Inf for weight(s) of shape {shapes} "
            "(the weight is all zero or holds NaN/Inf); the normalized weight would be "
            "NaN. Check the learning rate / loss for divergence, or re-initialize the layer.")


def _power_iterate(items: list[tuple], check_finite: bool | None) -> None:
    """One multi-tensor power iteration per (device, dtype, n_iter, eps, backend) group.

    ``items``: (layer, weight, u, v), u and v the tensors to update (the layer's buffers, or what
    a compiled graph hands the refresh op in their place). Marks each layer fresh for ``weight``.
    Runs after every optimizer step, so it keeps host work small: a layer's inputs are checked in
    full only when their shape, dtype or device changed since the last check.
    """
    if check_finite is None:
        check_finite = _CHECK_FINITE
    groups: dict[tuple, list[tuple]] = {}
    seen = []
    for item in items:
        sn, weight, u, v = item
        device, dtype, ptr = weight.device, weight.dtype, weight.data_ptr()
        # The same storage and the same u, v objects: the same shapes as at the last full check
        # (.to(), load_state_dict(assign=True) or a new Parameter change one of them).
        identity = (ptr, dtype, device, id(u), id(v))
        if sn._checked != identity:
            check_spectral_norm_inputs(weight, u, v, sn.dim, "spectral norm")
            object.__setattr__(sn, "_checked", identity)
        groups.setdefault((device, dtype, sn.n_power_iterations, sn.eps, sn.backend), []).append(item)
        seen.append((weight._version, ptr, dtype, device))
    for (device, _, n_iter, eps, backend), members in groups.items():
        with torch.no_grad():
            sigmas = power_iteration_checked_(
                [w for _, w, _, _ in members], [u for _, _, u, _ in members], [v for _, _, _, v in members],
                [sn.dim for sn, _, _, _ in members], n_power_iterations=n_iter, eps=eps, backend=backend)
            if check_finite and not _capturing(device):
                _raise_if_degenerate(sigmas, [tuple(w.shape) for _, w, _, _ in members])
        for i, (sn, _, _, _) in enumerate(members):
            object.__setattr__(sn, "_last_sigma", (sigmas, i))
    for (sn, _, _, _), key in zip(items, seen):  # the power iteration does not write the weight
        object.__setattr__(sn, "_seen", key)
        object.__setattr__(sn, "_n_updates", sn._n_updates + 1)


_CUDAGRAPH_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)  # torch >= 2.8; older: no tag


def _refresh_impl(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, layer_id: int) -> None:
    layer = _layer_by_id(layer_id)
    if layer._seen != _weight_key(weight):
        _power_iterate([(layer, weight, u, v)], None)


_refresh_op = torch.library.custom_op(
    "sagan_fast_nn::refresh_power_iteration_", _refresh_impl, mutates_args=("u", "v"),
    **({"tags": (_CUDAGRAPH_UNSAFE,)} if _CUDAGRAPH_UNSAFE is not None
       and "tags" in inspect.signature(torch.library.custom_op).parameters else {}))
_refresh_op.__doc__ = """Run time, inside a compiled graph: one power iteration of layer ``layer_id``
on u, v if ``weight`` changed since its last one (version counter, address, dtype, device)."""


@_refresh_op.register_fake
def _(weight, u, v, layer_id):
    return None


# --- the optimizer hook ---------------------------------------------------------------------

# optimizer -> (generation, param-group sizes, [(param, layer)]): the SN weights it steps.
_OPTIMIZER_MAPS: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple]" = weakref.WeakKeyDictionary()


def _map_optimizer(optimizer: torch.optim.Optimizer, sizes: tuple) -> list[tuple]:
    by_id: dict[int, list[SpectralNorm]] = {}
    for ref in list(_LAYERS.values()):
        sn = ref()
        if sn is None or not hasattr(sn, "_u"):
            continue
        weight = _raw_weight(sn)
        if weight is not None:
            by_id.setdefault(id(weight), []).append(sn)  # a list: a weight tied into several layers
    pairs = [(p, sn) for group in optimizer.param_groups for p in group["params"]
             for sn in by_id.get(id(p), ())]
    _OPTIMIZER_MAPS[optimizer] = (_GENERATION, sizes, pairs)
    return pairs


def _sn_params_of(optimizer: torch.optim.Optimizer) -> list[tuple]:
    sizes = tuple(len(group["params"]) for group in optimizer.param_groups)
    cached = _OPTIMIZER_MAPS.get(optimizer)
    if cached is None or cached[0] != _GENERATION or cached[1] != sizes:
        return _map_optimizer(optimizer, sizes)
    pairs = cached[2]
    for p, sn in pairs:
        if _raw_weight(sn) is not p:  # re-registered or replaced since the map was built
            return _map_optimizer(optimizer, sizes)
    return pairs


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global optimizer-step post-hook: power-iterate the SN weights this step just changed.

    Traceable up to the check, so a compiled optimizer step in a process without SN layers keeps
    its graph whole; the work itself runs eagerly (a graph break under torch.compile)."""
    if _LAYERS:
        _update_after_step(optimizer)


@torch.compiler.disable
def _update_after_step(optimizer: torch.optim.Optimizer) -> None:
    items = []
    for p, sn in _sn_params_of(optimizer):
        if p.grad is None:  # the optimizer skipped it
            continue
        if sn.training:
            buffers = sn._buffers
            items.append((sn, p, buffers["_u"], buffers["_v"]))
        else:
            object.__setattr__(sn, "_seen", None)  # eval: no update now, one at the next training forward
    if items:
        _power_iterate(items, None)


# A step that skipped its update on the device (fused optimizer + GradScaler after an inf) still
# gets its iteration here: harmless, u and v just move closer to the unchanged weight's.
_OPTIMIZER_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


# --- listing, updating, checking ------------------------------------------------------------

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
                if first._plist is not plist:
                    _adopt(first, plist)
                yield first, plist.original


def _adopt(sn: SpectralNorm, plist: nn.Module) -> None:
    """Tell ``sn`` which ParametrizationList it is first in (its raw weight is ``plist.original``)."""
    object.__setattr__(sn, "_plist", plist)
    object.__setattr__(sn, "_weight_ref", None)
    _bump_generation()


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
    items = [(sn, w, sn._u, sn._v) for sn, w in layers
             if sn.training and (force or sn._seen != _weight_key(w))]
    if items:
        _power_iterate(items, check_finite)
    return len(items)


@torch.compiler.disable
def check_spectral_norms(model: nn.Module | Iterable[nn.Module]) -> None:
    """Raise :class:`SpectralNormError` if any SN weight of ``model`` has a zero, NaN or Inf sigma.

    Looks at the sigmas of the last updates (one device sync for the whole model): the check to
    run at log steps after ``set_check_finite(False)``.
    """
    by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for sn, w in spectral_norm_layers(model):
        sigma = _last_sigma(sn)
        by_device.setdefault(sigma.device, []).append((sigma, w))
    for members in by_device.values():
        sigmas = torch.stack([(s.abs() if s.is_complex() else s).to(torch.float64) for s, _ in members])
        _raise_if_degenerate(sigmas, [tuple(w.shape) for _, w in members])


def _last_sigma(sn: SpectralNorm) -> torch.Tensor:
    """sigma = u . W v of ``sn``'s last power iteration (0-dim view; a CUDA graph replay updates it)."""
    sigmas, i = sn._last_sigma
    return sigmas[i]


# --- fuse_spectral_norms: one small state object per model ------------------------------------

class _Fusion:
    """What :func:`fuse_spectral_norms` keeps for one model (the model's only added attribute,
    ``_sagan_fast_sn_fusion``): its SN layers and whether to normalize them all at once. Its bound
    methods are the model's forward hooks, so ``copy.deepcopy`` of the model copies them together."""

    def __init__(self, layers: list[SpectralNorm], normalize_all: bool) -> None:
        self.layers = layers
        self.normalize_all = normalize_all

    def pairs(self) -> list[tuple[SpectralNorm, torch.Tensor]]:
        # The raw weight is read at every forward (cheap): a re-registered weight is seen.
        return [(sn, _raw_weight(sn)) for sn in self.layers]

    @torch.compiler.disable
    def pre_hook(self, module: nn.Module, args) -> None:
        if not module.training:
            return
        pairs = self.pairs()
        _update_layers(pairs, False, None)
        if self.normalize_all:
            self._normalize_all(pairs)

    @torch.compiler.disable
    def post_hook(self, module: nn.Module, args, output) -> None:
        if self.normalize_all:
            for sn in self.layers:
                object.__setattr__(sn, "_w_sn_stash", None)

    @staticmethod
    def _normalize_all(pairs) -> None:
        """W_sn of every training-mode SN layer at once (two launches per group on triton),
        stashed on the layers for this forward."""
        groups: dict[tuple, list[tuple[SpectralNorm, torch.Tensor]]] = {}
        for sn, w in pairs:
            if sn.training:
                groups.setdefault((w.device, sn.backend), []).append((sn, w))
        grad_mode = torch.is_grad_enabled()
        for (_, backend), members in groups.items():
            out_dtypes = [sn._output_dtype(w) for sn, w in members]
            w_sns = spectral_norm_normalize_multi(
                [w for _, w in members], [sn._u for sn, _ in members], [sn._v for sn, _ in members],
                [sn.dim for sn, _ in members], backend=backend, out_dtypes=out_dtypes)
            for (sn, w), w_sn, out_dtype in zip(members, w_sns, out_dtypes):
                object.__setattr__(sn, "_w_sn_stash", (w_sn, _weight_key(w), grad_mode, out_dtype))


_FUSION_ATTR = "_sagan_fast_sn_fusion"


def fuse_spectral_norms(model: nn.Module, *, normalize_all: bool = True) -> nn.Module:
    """Update all SN weights of ``model`` together, once per weight update, before its forward.

    Installs forward hooks on ``model`` (idempotent). With ``normalize_all`` (eager mode only),
    the pre-hook also computes every layer's W / sigma at once (two launches on the triton
    backend, and one multi-tensor backward) and the layers use it during this forward; under
    torch.compile, and for a layer called outside the model's forward, each layer normalizes its
    own weight. The layers keep working alone too. The list of SN layers is taken now: call
    again after adding or removing SN layers.

    Trade-off of ``normalize_all``: the model-level backward runs once every W_sn gradient has
    arrived, i.e. at the end of the model's backward, so under DDP the SN weights' gradients are
    all ready at the end instead of layer by layer (less all-reduce / backward overlap). Pass
    ``normalize_all=False`` to keep per-layer backward there if the bench says it is faster.
    """
    layers = [sn for sn, _ in spectral_norm_layers(model)]
    for sn in layers:
        object.__setattr__(sn, "_fused", True)
    fusion = model.__dict__.get(_FUSION_ATTR)
    if fusion is None:
        fusion = _Fusion(layers, bool(normalize_all))
        object.__setattr__(model, _FUSION_ATTR, fusion)
        model.register_forward_pre_hook(fusion.pre_hook)
        model.register_forward_hook(fusion.post_hook, always_call=True)
    else:
        fusion.layers, fusion.normalize_all = layers, bool(normalize_all)
    return model


# --- public state: what checkpoints, training steps and benchmarks read or restore -------------

def _layers_by_name(model: nn.Module):
    """(qualified name of the parametrization, SpectralNorm, raw weight) for our SN layers."""
    for name, module in model.named_modules():
        if isinstance(module, SpectralNorm) and hasattr(module, "_u"):
            plist = model.get_submodule(name.rsplit(".", 1)[0])
            if plist[0] is module:
                if module._plist is not plist:
                    _adopt(module, plist)
                yield name, module, plist.original


def spectral_norm_state(model: nn.Module) -> dict[str, dict]:
    """What the module state dict does not hold, per SN layer of ours (keyed by its module name):
    the last sigma and whether u, v are up to date for the current weight.

    Restoring both with :func:`load_spectral_norm_state` makes a resumed run do exactly the power
    iterations the uninterrupted run does (none extra after loading), so resuming is bit-exact.
    """
    return {name: {"sigma": _last_sigma(sn).detach().clone(), "fresh": not sn.is_stale(weight)}
            for name, sn, weight in _layers_by_name(model)}


def load_spectral_norm_state(model: nn.Module, state: dict[str, dict]) -> None:
    """Restore :func:`spectral_norm_state`; call after ``model.load_state_dict`` (which wrote the
    weights, so every layer looks changed). A layer missing from ``state`` is a ``KeyError``."""
    for name, sn, weight in _layers_by_name(model):
        if name not in state:
            raise KeyError(f"checkpoint has no spectral norm state for {name!r}")
        sigma = torch.as_tensor(state[name]["sigma"]).to(weight.device, accumulation_dtype(weight.dtype))
        object.__setattr__(sn, "_last_sigma", (sigma.reshape(1), 0))
        if state[name]["fresh"]:
            sn.mark_fresh(weight)
        else:
            sn.mark_stale()


def mark_weights_changed(models: nn.Module | Iterable[nn.Module]) -> int:
    """Declare that the SN weights of ``models`` (a model or several, searched recursively) changed
    in a way neither the optimizer hook nor autograd's version counter sees: a write through
    ``.data``, from C++ or from another process. The next training-mode forward of each layer
    (or :func:`update_spectral_norms`) runs its power iteration. Returns how many layers were marked.

    Not needed after optimizer steps (any torch.optim optimizer, fused, capturable, inside a CUDA
    graph or a compiled step) nor after in-place writes autograd sees (``copy_``, ``lerp_``,
    ``load_state_dict``, ``.to()``)."""
    count = 0
    for model in ([models] if isinstance(models, nn.Module) else list(models)):
        for sn, _ in spectral_norm_layers(model):
            sn.mark_stale()
            count += 1
    return count


def _sn_entries(model: nn.Module):
    """(module name, parametrization name, parametrization, raw weight) for every spectrally
    normalized weight of ``model`` with 2+ dims, ours or torch's."""
    for name, m in model.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        for pname, plist in m.parametrizations.items():
            sn = plist[0]
            if hasattr(sn, "_u") and hasattr(sn, "_v") and plist.original.ndim > 1:
                yield name, pname, sn, plist.original


def spectral_norm_update_counts(model: nn.Module) -> dict[str, int]:
    """How many power-iteration updates each SN layer of ours in ``model`` ran so far (each of
    ``n_power_iterations`` iterations), keyed like :func:`normalized_sigmas`: to check that a
    training loop updates once per optimizer step. Counted on the host: an update captured in a
    CUDA graph counts once, at capture; its replays run it without counting."""
    counts = {}
    for name, pname, sn, _ in _sn_entries(model):
        if isinstance(sn, SpectralNorm):
            counts[f"{name}.{pname}" if name else pname] = sn._n_updates
    return counts


@torch.no_grad()
def spectral_norm_sigmas(model: nn.Module) -> torch.Tensor:
    """sigma = u . W v of every spectrally normalized weight of ``model`` from its stored u, v
    (ours or torch's parametrization), float32, in module order; empty when there is none."""
    sigmas = []
    for _, _, sn, weight in _sn_entries(model):
        sigma = spectral_norm_sigma(weight.detach(), sn._u, sn._v, getattr(sn, "dim", 0))
        sigmas.append((sigma.abs() if sigma.is_complex() else sigma).float().reshape(()))
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
    for name, pname, sn, weight in _sn_entries(model):
        mat = reference.weight_to_matrix(weight.detach(), getattr(sn, "dim", 0))
        dtype = torch.promote_types(mat.dtype, torch.float64)
        mat = mat.to(dtype)
        sigma = reference.spectral_norm_sigma(mat, sn._u.to(dtype), sn._v.to(dtype))
        out[f"{name}.{pname}" if name else pname] = torch.linalg.matrix_norm(mat / sigma, ord=2).abs()
    return _to_floats(out)


def _to_floats(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-d float64 tensors (on any devices) as Python floats, with one copy to the host per device."""
    by_device: dict[torch.device, list[str]] = {}
    for key, value in values.items():
        by_device.setdefault(value.device, []).append(key)
    out = {}
    for keys in by_device.values():
        out.update(zip(keys, torch.stack([values[k] for k in keys]).cpu().tolist()))
    return {key: out[key] for key in values}


def _residual_tolerance(dtype: torch.dtype) -> float:
    """The largest :func:`power_iteration_residuals` value a layer whose u, v come from a power
    iteration on its current weight may show: rounding of the reductions (fp32 / fp64: 1e-4; the
    SAGAN-128 ch=64 weight shapes give at most 6e-7 on a CPU, reference, cuda's C++ ops and
    Triton's interpreter alike) or of u, v stored in 16 bits (4 eps). Skipped updates leave far
    more: 2e-4 to 1e-2 after two skipped Adam steps of bench/train_step.py at its CPU size."""
    return max(1e-4, 4 * torch.finfo(dtype).eps)


@torch.no_grad()
def power_iteration_residuals(model: nn.Module) -> dict[str, float]:
    """``|| v - normalize(W^H u) ||`` for every SN layer of ours in ``model`` that its next
    training-mode forward will *not* update (it saw its weight's last change), keyed like
    :func:`normalized_sigmas`; float64.

    A power iteration ends with ``v = normalize(W^H u)``, so for u, v computed from the current
    weight this is 0 up to rounding, however far the iteration is from converged. A weight changed
    after its layer's last update without the layer seeing it (an update skipped: an optimizer or
    write the update mechanism missed, a ``.data`` write not followed by
    :func:`mark_weights_changed`) shows here at first order in the change, where the sigma of W_sn
    (:func:`normalized_sigmas`) moves only at second order. Layers whose next
    training forward updates them anyway (a change seen, or marked) are left out.
    """
    out = {}
    for name, pname, sn, weight in _sn_entries(model):
        if not isinstance(sn, SpectralNorm) or sn.is_stale(weight) or weight.device.type == "meta":
            continue
        mat = reference.weight_to_matrix(weight.detach(), sn.dim)
        dtype = torch.promote_types(mat.dtype, torch.float64)
        u, v = sn._u.to(dtype), sn._v.to(dtype)
        v_next = F.normalize(torch.mv(mat.to(dtype).H, u), dim=0, eps=sn.eps)
        out[f"{name}.{pname}" if name else pname] = (v - v_next).norm()
    return _to_floats(out)


def assert_normalized(models: nn.Module | Iterable[nn.Module], tol: float = 0.02) -> None:
    """Raise :class:`SpectralNormError` unless every SN weight is normalized: what every benchmark
    checks after timing a training step.

    Two checks: every weight's :func:`normalized_sigmas` is within ``tol`` (relative) of 1, and every
    layer of ours whose next training forward would not update it has u, v from a power iteration
    on its current weight (:func:`power_iteration_residuals` at most 1e-4 for fp32 / fp64 weights,
    4 eps for 16-bit ones). The second catches a skipped update exactly, including the early steps of
    a run, where one power iteration per step has not yet converged (so the first needs a ``tol``
    loose enough for that: torch's spectral norm is as far from 1 then) and a skipped update still
    leaves sigma within it.
    """
    bad, stale = {}, {}
    for i, model in enumerate([models] if isinstance(models, nn.Module) else list(models)):
        for name, s in normalized_sigmas(model).items():
            if not abs(s - 1.0) <= tol:
                bad[f"model{i}:{name}"] = round(s, 4)
        dtypes = {f"{n}.{p}" if n else p: w.dtype for n, p, _, w in _sn_entries(model)}
        for name, r in power_iteration_residuals(model).items():
            if not r <= _residual_tolerance(dtypes[name]):
                stale[f"model{i}:{name}"] = float(f"{r:.3g}")
    problems = []
    if bad:
        problems.append(f"spectral norm did not normalize {len(bad)} weight(s) (largest singular value of "
                        f"W_sn, expected 1 +- {tol}): {bad}")
    if stale:
        problems.append(f"{len(stale)} weight(s) changed after their last power iteration without their "
                        "layer seeing it (an update was skipped; after a write through .data call "
                        f"mark_weights_changed): || v - normalize(W^H u) || = {stale}")
    if problems:
        raise SpectralNormError("; ".join(problems))


def convert_hook_spectral_norm_state_dict(state_dict: dict, model: nn.Module | None = None) -> dict:
    """A state dict saved with torch's old hook API (``torch.nn.utils.spectral_norm``: keys
    ``<module>.weight_orig``, ``<module>.weight_u``, ``<module>.weight_v``), renamed for
    :func:`spectral_norm` (``<module>.parametrizations.weight.original``, ``...weight.0._u``,
    ``...weight.0._v``); every other key is kept. Load the result with ``model.load_state_dict``.

    The same u, v: both APIs keep u (rows) and v (columns) of the same (out, rest) matrix, so the
    converted model's eval output is the old one's, and its first training forward continues the
    old run's power iteration (in the parametrization's order, u then v; the hook did v then u,
    so that one iteration differs slightly). Checkpoints from before torch 1.0 (no ``weight_v``,
    the normalized ``weight`` stored instead) get v solved as torch's own loader does, in float64,
    along ``dim`` from ``model``'s SN layer of that name (else 0).
    """
    dims = {}
    if model is not None:
        for name, pname, sn, _ in _sn_entries(model):
            dims[f"{name + '.' if name else ''}parametrizations.{pname}"] = getattr(sn, "dim", 0)
    out = type(state_dict)() if isinstance(state_dict, dict) else {}
    metadata = getattr(state_dict, "_metadata", None)
    bases = {key[:-len("_orig")] for key in state_dict
             if key.endswith("_orig") and key[:-len("_orig")] + "_u" in state_dict}
    for key, value in state_dict.items():
        base = next((b for b in (key[:-len(s)] for s in ("_orig", "_u", "_v") if key.endswith(s))
                     if b in bases), None)
        if key in bases or base is None:
            if key not in bases:  # the old format's stored W / sigma: not a state of ours
                out[key] = value
            continue
        prefix, _, tensor_name = base.rpartition(".")
        new_base = f"{prefix + '.' if prefix else ''}parametrizations.{tensor_name}"
        suffix = key[len(base):]
        out[{"_orig": f"{new_base}.original", "_u": f"{new_base}.0._u",
             "_v": f"{new_base}.0._v"}[suffix]] = value
    for base in bases:
        if base + "_v" in state_dict:
            continue
        if base not in state_dict:
            raise KeyError(f"convert_hook_spectral_norm_state_dict: {base!r} has neither {base}_v nor the "
                           "normalized weight the pre-1.0 format stored; cannot recover v")
        prefix, _, tensor_name = base.rpartition(".")
        new_base = f"{prefix + '.' if prefix else ''}parametrizations.{tensor_name}"
        with torch.no_grad():
            weight_orig, u = state_dict[base + "_orig"], state_dict[base + "_u"]
            wide = torch.promote_types(weight_orig.dtype, torch.float64)  # a pseudo-inverse: in float64
            sigma = (weight_orig.to(wide) / state_dict[base].to(wide)).mean()
            mat = reference.weight_to_matrix(weight_orig.to(wide), dims.get(new_base, 0))
            u = u.to(wide)
            # torch's _solve_v_and_rescale: u = normalize(W v) and u . W v = sigma
            v = torch.linalg.multi_dot([mat.t().mm(mat).pinverse(), mat.t(), u.unsqueeze(1)]).squeeze(1)
            v *= sigma / reference.spectral_norm_sigma(mat, u, v)
            out[f"{new_base}.0._v"] = v.to(state_dict[base + "_u"].dtype)
    if metadata is not None:
        out._metadata = metadata
    return out


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
    # Their forward's op (conv*, linear) is one autocast runs in lower precision: W_sn in that dtype.
    object.__setattr__(sn, "_autocast_output", isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)))
    # register_parametrization evaluates the parametrization once (a training-mode forward, so one
    # power iteration, as torch's does too); the first real forward must iterate again, as torch's.
    parametrize.register_parametrization(module, name, sn)
    plist = module.parametrizations[name]
    if plist[0] is sn:
        _adopt(sn, plist)
    sn.mark_stale()
    # Counted from here: the registration's evaluation is not an update.
    object.__setattr__(sn, "_n_updates", 0)
    return module
