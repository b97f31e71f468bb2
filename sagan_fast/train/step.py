"""The SAGAN training step, one object: ``d_steps`` discriminator updates, then one generator update.

::

    step = GANStep(G, D, opt_G, opt_D, precision="bf16")              # the fast path (the defaults)
    step = GANStep(G, D, opt_G, opt_D, precision="fp32", **PLAIN)      # every speed option off
    stats = step([(real, y)])       # one (real, labels or None) pair per D update, as they come

``stats`` is a dict of detached device scalars (:data:`STAT_NAMES`: the last D update's loss, mean
D(real) and mean D(fake), and the G loss), read back only where the caller pays a sync anyway (log
steps). The math is the same with every option: per real batch, z ~ N(0, I) (and uniform labels
for a conditional G) drawn on the device, fake = G(z) without gradients, hinge loss
relu(1 - D(real)) + relu(1 + D(fake)), one step of ``opt_D``; then fresh z, G loss -mean D(G(z)), one
step of ``opt_G``. Noise is drawn in the same order in every configuration, so from one seed the
plain and the fast step see the same noise (tests/test_train_step.py compares them).

The speed options (all off in :data:`PLAIN`; on by default except ``cuda_graphs``):

- ``channels_last``: a forward pre-hook on every Conv2d hands it an NHWC input (a no-op once the
  first conv's output is NHWC, so it happens once per model forward). Weights keep their default
  layout: the SN kernels read them as (out, rest) matrices.
- ``d_on_cat``: D runs once on ``cat([real, fake])`` instead of twice. Our D has no batch
  statistics (SN, no BN), so each logit is the same function of its own image as in two calls (up
  to float summation order; tests/test_train.py checks it); one forward and one backward means one
  DDP gradient reduction and larger kernels. The batch is concatenated in the dtype D's first conv
  casts to anyway (bf16 under autocast): half the bytes.
- ``freeze_d``: in the G step D's parameters have ``requires_grad`` off: the plain step computes
  D's weight gradients there and throws them away; skipping them saves about a third of that
  backward. (D is called unwrapped in the G step either way: nothing of D is reduced there.)
- ``compile`` (None: on for CUDA, off on a CPU, where Inductor is slow to compile and not what
  this is for): ``torch.compile`` (static shapes, ``compile_backend``) of the D and G
  forward-and-loss functions; our ops are torch.library ops, so they stay inside the graphs. The
  default on CUDA because plain PyTorch's step is dominated by many small memory-bound kernels
  (BN, ReLU, adds, casts, SN) that compilation *fuses* (docs/DESIGN.md, measured anchors).
- ``cuda_graphs``: after ``graph_warmup`` eager steps (cuDNN and Triton autotuning, lazy
  optimizer state), the whole step (both updates, both optimizer steps) is captured once into one
  CUDA graph and replayed: one launch per step. The optimizers are made ``capturable`` (their step
  counters move to the device); the batches are copied into static inputs. Not with DDP.

Two settings that are not speed options: ``precision`` ("fp32", or "bf16": autocast, with the
float32 weights and optimizer state the caller owns; SN reduces in float32, D's logits and the
losses are float32) and ``parametrize_cached`` (wrap each forward in ``parametrize.cached()``, for
torch's SN parametrization: one power iteration per step instead of one per forward, and what lets
torch's SN run under ``torch.compile`` at all).

No host-device sync inside the step, in any configuration: our SN's per-update finite check is
switched off while the step runs; :meth:`GANStep.check_spectral_norms` does it for both models
(one sync) when the caller chooses, e.g. at log steps. ``G``, ``D`` may be DDP-wrapped.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..nn.spectral_norm import check_spectral_norms, set_check_finite
from .distributed import unwrap
from .losses import hinge_loss_d, hinge_loss_g

PRECISIONS = ("fp32", "bf16")
STAT_NAMES = ("loss_d", "loss_g", "d_real", "d_fake")
PLAIN = dict(channels_last=False, d_on_cat=False, freeze_d=False, compile=False, cuda_graphs=False)
"""Every speed option off: the textbook step (eager, NCHW, D on real then on fake, D's gradients
computed in the G step)."""
PRESETS = {"fast": {}, "plain": PLAIN}
"""The training loop's ``--step-impl`` choices: keyword arguments of :class:`GANStep`."""

Batch = tuple[torch.Tensor, "torch.Tensor | None"]


def sample_latents(batch: int, z_dim: int, n_classes: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """z ~ N(0, I) and, for a conditional model, uniform class labels (drawn in that order)."""
    z = torch.randn(batch, z_dim, device=device)
    y = torch.randint(n_classes, (batch,), device=device) if n_classes > 0 else None
    return z, y


def _channels_last_pre_hook(module: nn.Module, args):
    x = args[0]
    if isinstance(x, torch.Tensor) and x.ndim == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        return (x.contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
    return None


def _first_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _make_capturable(opt: torch.optim.Optimizer) -> None:
    """Adam/AdamW & co. can be captured in a CUDA graph only with their step counters on the device."""
    for group in opt.param_groups:
        if "capturable" not in group:
            raise ValueError(f"cuda_graphs=True: {type(opt).__name__} has no 'capturable' option; "
                             "use Adam or AdamW")
        group["capturable"] = True
    for p, state in opt.state.items():
        step = state.get("step")
        if isinstance(step, torch.Tensor) and step.device != p.device:
            state["step"] = step.to(p.device)


class GANStep:
    """One SAGAN training iteration (``d_steps`` D updates, one G update); see the module doc.

    ``z_dim`` and ``n_classes`` default to the generator's attributes of those names.
    ``compile_backend`` is passed to torch.compile ("inductor"; tests use "aot_eager").
    """

    def __init__(self, G: nn.Module, D: nn.Module, opt_G: torch.optim.Optimizer, opt_D: torch.optim.Optimizer,
                 *, precision: str = "bf16", d_steps: int = 1, channels_last: bool = True,
                 d_on_cat: bool = True, freeze_d: bool = True, compile: bool | None = None,
                 compile_backend: str = "inductor", cuda_graphs: bool = False, graph_warmup: int = 3,
                 parametrize_cached: bool = False, z_dim: int | None = None,
                 n_classes: int | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if isinstance(d_steps, bool) or not isinstance(d_steps, int) or d_steps < 1:
            raise ValueError(f"d_steps must be an int >= 1, got {d_steps!r}")
        self.G, self.D, self.opt_G, self.opt_D = G, D, opt_G, opt_D
        self.G_raw, self.D_raw = unwrap(G), unwrap(D)
        self.z_dim = z_dim if z_dim is not None else getattr(self.G_raw, "z_dim", None)
        self.n_classes = n_classes if n_classes is not None else getattr(self.G_raw, "n_classes", 0)
        if not isinstance(self.z_dim, int):
            raise ValueError("z_dim: the generator has no int attribute 'z_dim'; pass z_dim=")
        self.device = _first_device(self.G_raw)
        self.precision, self.d_steps = precision, d_steps
        self.channels_last, self.d_on_cat, self.freeze_d = channels_last, d_on_cat, freeze_d
        self.compile = (self.device.type == "cuda") if compile is None else bool(compile)
        self.cuda_graphs, self.graph_warmup = bool(cuda_graphs), graph_warmup
        self._cached = parametrize.cached if parametrize_cached else contextlib.nullcontext
        if self.cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError("cuda_graphs=True needs the models on a CUDA device")
            if self.G is not self.G_raw or self.D is not self.D_raw:
                raise ValueError("cuda_graphs=True is not supported with DDP-wrapped models "
                                 "(use compile=True, the default on CUDA)")
            if graph_warmup < 1:
                raise ValueError(f"graph_warmup must be >= 1 (cuDNN/Triton autotuning must not be "
                                 f"captured), got {graph_warmup}")
            _make_capturable(opt_G)
            _make_capturable(opt_D)
        self._D_params = [p for p in self.D_raw.parameters() if p.requires_grad]
        self._hooks = []
        if channels_last:
            for model in (self.G_raw, self.D_raw):
                for m in model.modules():
                    if isinstance(m, nn.Conv2d):
                        self._hooks.append(m.register_forward_pre_hook(_channels_last_pre_hook))
        d_loss, g_loss = self._d_loss, self._g_loss
        if self.compile:
            d_loss = torch.compile(d_loss, backend=compile_backend, dynamic=False)
            g_loss = torch.compile(g_loss, backend=compile_backend, dynamic=False)
        self._d_loss_fn: Callable = d_loss
        self._g_loss_fn: Callable = g_loss
        self._calls = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: dict = {}

    # --- the math --------------------------------------------------------------------------------------

    def _autocast(self):
        if self.precision == "bf16":
            # No weight-cast cache across a CUDA graph capture (casts must be recorded in it).
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not self.cuda_graphs)
        return contextlib.nullcontext()

    def _d_loss(self, real: torch.Tensor, y_real: torch.Tensor | None, z: torch.Tensor,
                y_fake: torch.Tensor | None):
        """(hinge loss of D, mean D(real), mean D(fake)) on one real batch and G(z)."""
        with self._cached(), self._autocast():
            with torch.no_grad():
                fake = self.G_raw(z, y_fake)
            if self.d_on_cat:
                dtype = torch.bfloat16 if self.precision == "bf16" else real.dtype
                x = torch.cat([real.to(dtype), fake.to(dtype)])
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = torch.cat([y_real, y_fake]) if y_real is not None else None
                d_real, d_fake = self.D(x, y).float().split(real.shape[0])
            else:
                d_real, d_fake = self.D(real, y_real).float(), self.D(fake.to(real.dtype), y_fake).float()
        return hinge_loss_d(d_real, d_fake), d_real.detach().mean(), d_fake.detach().mean()

    def _g_loss(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        with self._cached(), self._autocast():
            logits = self.D_raw(self.G(z, y), y)
        return hinge_loss_g(logits)

    def _set_d_requires_grad(self, flag: bool) -> None:
        for p in self._D_params:
            p.requires_grad_(flag)

    def _eager_step(self, batches: Sequence[Batch]) -> torch.Tensor:
        """The step, without syncs; returns the statistics stacked (4,) in STAT_NAMES order."""
        previous = set_check_finite(False)
        try:
            for real, y_real in batches:
                z, y_fake = sample_latents(real.shape[0], self.z_dim, self.n_classes, self.device)
                loss_d, d_real, d_fake = self._d_loss_fn(real, y_real, z, y_fake)
                self.opt_D.zero_grad(set_to_none=True)
                loss_d.backward()
                self.opt_D.step()
            z, y = sample_latents(batches[-1][0].shape[0], self.z_dim, self.n_classes, self.device)
            if self.freeze_d:
                self._set_d_requires_grad(False)
            try:
                loss_g = self._g_loss_fn(z, y)
                self.opt_G.zero_grad(set_to_none=True)
                loss_g.backward()
            finally:
                if self.freeze_d:
                    self._set_d_requires_grad(True)
            self.opt_G.step()
        finally:
            set_check_finite(previous)
        return torch.stack([loss_d.detach(), loss_g.detach(), d_real, d_fake])

    # --- the public face ---------------------------------------------------------------------------------

    def _check_batches(self, batches: Sequence[Batch]) -> None:
        if not isinstance(batches, (list, tuple)) or len(batches) != self.d_steps:
            got = f"{len(batches)} item(s)" if isinstance(batches, (list, tuple)) else type(batches).__name__
            raise ValueError(f"GANStep: expected a list of d_steps={self.d_steps} (real, y) pairs, got {got}")
        shape = None
        for item in batches:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise ValueError(f"GANStep: each batch must be a (real, y) pair, got {type(item).__name__}")
            real, y = item
            if not isinstance(real, torch.Tensor) or real.ndim != 4 or not real.is_floating_point():
                what = tuple(real.shape) if isinstance(real, torch.Tensor) else type(real).__name__
                raise ValueError(f"GANStep: real must be a float (B, C, H, W) tensor, got {what}")
            if real.device != self.device:
                raise ValueError(f"GANStep: real is on {real.device} but the models are on {self.device}")
            if shape is not None and real.shape != shape:
                raise ValueError(f"GANStep: the d_steps batches must have one shape, got {tuple(shape)} "
                                 f"and {tuple(real.shape)}")
            shape = real.shape
            if (y is None) != (self.n_classes == 0):
                raise ValueError(f"GANStep: y must be {'None' if self.n_classes == 0 else 'given'} "
                                 f"(n_classes={self.n_classes})")

    def __call__(self, batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
        """One iteration: a D update on each of the ``d_steps`` (real, y) pairs, in order, then a G
        update (on as many images as one real batch)."""
        self._check_batches(batches)
        stats = self._graphed_step(batches) if self.cuda_graphs else self._eager_step(batches)
        self._calls += 1
        return dict(zip(STAT_NAMES, stats.unbind()))

    def _graphed_step(self, batches: Sequence[Batch]) -> torch.Tensor:
        if self._graph is None and self._calls < self.graph_warmup:
            # Warm-up on a side stream, as torch.cuda.graph asks: autotuners and lazy state run here.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                stats = self._eager_step(batches)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return stats
        if self._graph is None:
            self._static["batches"] = [(real.clone(), y.clone() if y is not None else None)
                                       for real, y in batches]
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._static["stats"] = self._eager_step(self._static["batches"])
            self._graph = graph  # capture recorded the step without running it: replay below runs it
        else:
            for (real, y), (static_real, static_y) in zip(batches, self._static["batches"]):
                static_real.copy_(real)
                if y is not None:
                    static_y.copy_(y)
        # The SN power iterations were captured right after each optimizer step (sagan_fast.nn's
        # optimizer hook ran during capture), so the replay keeps u, v and their marks true.
        self._graph.replay()
        return self._static["stats"].clone()

    def check_spectral_norms(self) -> None:
        """Raise SpectralNormError if a SN weight of G or D is degenerate (one sync): call at log steps."""
        check_spectral_norms(self.G_raw)
        check_spectral_norms(self.D_raw)

    def close(self) -> None:
        """Remove the channels_last hooks from the models (they are harmless to keep)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


__all__ = ["GANStep", "PLAIN", "PRECISIONS", "PRESETS", "STAT_NAMES", "sample_latents"]
