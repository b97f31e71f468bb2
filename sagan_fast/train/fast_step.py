"""The fast SAGAN training step: one callable that does ``d_steps`` D updates and one G update.

``step = make_gan_step(G, D, opt_G, opt_D, precision="bf16")`` then ``stats = step(real, y)`` every
iteration; ``stats`` is a dict of detached device scalars (``loss_d``, ``loss_g``, ``d_real``,
``d_fake``, as :class:`~sagan_fast.train.loop.StepStats`), read back only where the caller pays
a sync anyway (log steps). The math is the plain step's (:func:`sagan_fast.train.loop.train_step`):
the same noise draws in the same order, hinge loss, the optimizers given. What makes it fast:

- bf16 autocast (``precision="bf16"``) with the float32 master weights and optimizer state the
  caller owns; our spectral norm reduces in float32 and D's logits and the losses are float32.
- channels_last activations: a forward pre-hook on every Conv2d hands it an NHWC input (a no-op
  once the first conv's output is NHWC, so it happens once per model forward). Weights stay in
  their default layout: the SN kernels read them as (out, rest) matrices.
- D runs once on ``cat([real, fake])`` (D has no batch statistics, so this equals two calls) and,
  in the G step, with its parameters' ``requires_grad`` off: the plain step computes D's weight
  gradients there and throws them away; skipping them saves about a third of that backward.
  D is called unwrapped there (no DDP bookkeeping: nothing of D is reduced in a G step).
- No host-device sync inside the step: noise is drawn on the device, our SN's per-update
  finite check is switched off while the step runs (:func:`check_spectral_norms` of this object
  does it for the whole model, one sync, at log steps), nothing calls ``.item()``.
- Launch overhead removed, two ways (combinable):

  ``compile=True`` (the default on CUDA): ``torch.compile`` (default mode, static shapes) of the
  D and G forward-and-loss functions; backward runs through AOTAutograd's compiled graphs, our
  ops are torch.library ops so they stay inside the graphs. Chosen as the default because the
  anchors in DESIGN.md show plain PyTorch's step is dominated by many small memory-bound kernels
  (BN, ReLU, adds, casts, SN) that compilation *fuses*, which removes their memory traffic and not
  only their launch cost (compiled no-SN plain PyTorch: 1292 img/s against 782 eager); CUDA
  graphs alone remove launch cost but fuse nothing. Its cost is compile time at the first steps.

  ``cuda_graphs=True``: after ``graph_warmup`` eager steps (cuDNN autotuning, Triton autotuning,
  lazy optimizer state), the whole step (both D and G updates and both optimizer steps) is
  captured once into one CUDA graph and replayed: one launch per step. The optimizers are made
  ``capturable`` (their step counters move to the device). The batch is copied into a static
  input. torch.compile's "reduce-overhead" mode failed on the plain step because G runs twice per
  step and its graph output was overwritten; capturing the step as one graph does not have that
  problem (nothing escapes it but the returned statistics, which are copied out). Not with DDP.

Numerically, fp32 without compile equals the plain step up to float rounding of a different
convolution layout; tests/test_train_step.py checks losses and weights after several steps.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from ..nn.spectral_norm import check_spectral_norms, mark_weights_changed, set_check_finite
from .distributed import unwrap
from .losses import hinge_loss_d, hinge_loss_g

PRECISIONS = ("fp32", "bf16")
STAT_NAMES = ("loss_d", "loss_g", "d_real", "d_fake")


def _sample_latents(batch: int, z_dim: int, n_classes: int, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    # Same draws in the same order as loop.sample_latents (z, then labels): the tests compare the
    # fast step with the plain one from one seed. Not imported: loop.py imports this module.
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
    """One SAGAN training iteration (``d_steps`` D updates, one G update), fast; see the module doc.

    ``G``, ``D`` may be DDP-wrapped (then ``cuda_graphs`` must stay off). ``z_dim`` and
    ``n_classes`` default to the generator's attributes of those names. ``compile``: None means
    True on CUDA, False on CPU (Inductor on a CPU is slow to compile and not what this is for);
    ``compile_backend`` is passed to torch.compile ("inductor"; tests use "aot_eager").
    """

    def __init__(self, G: nn.Module, D: nn.Module, opt_G: torch.optim.Optimizer, opt_D: torch.optim.Optimizer,
                 *, precision: str = "bf16", channels_last: bool = True, compile: bool | None = None,
                 compile_backend: str = "inductor", cuda_graphs: bool = False, graph_warmup: int = 3,
                 d_steps: int = 1, z_dim: int | None = None, n_classes: int | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if not isinstance(d_steps, int) or d_steps < 1:
            raise ValueError(f"d_steps must be an int >= 1, got {d_steps!r}")
        self.G, self.D, self.opt_G, self.opt_D = G, D, opt_G, opt_D
        self.G_raw, self.D_raw = unwrap(G), unwrap(D)
        self.z_dim = z_dim if z_dim is not None else getattr(self.G_raw, "z_dim", None)
        self.n_classes = n_classes if n_classes is not None else getattr(self.G_raw, "n_classes", 0)
        if not isinstance(self.z_dim, int):
            raise ValueError("z_dim: the generator has no int attribute 'z_dim'; pass z_dim=")
        self.device = _first_device(self.G_raw)
        self.precision, self.channels_last, self.d_steps = precision, channels_last, d_steps
        self.compile = (self.device.type == "cuda") if compile is None else bool(compile)
        self.cuda_graphs = bool(cuda_graphs)
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
        self.graph_warmup = graph_warmup
        self._D_params = [p for p in self.D_raw.parameters() if p.requires_grad]
        self._hooks = []
        if channels_last:
            for model in (self.G_raw, self.D_raw):
                for m in model.modules():
                    if isinstance(m, nn.Conv2d):
                        self._hooks.append(m.register_forward_pre_hook(_channels_last_pre_hook))
        d_forward, g_forward = self._d_forward, self._g_forward
        if self.compile:
            d_forward = torch.compile(d_forward, backend=compile_backend, dynamic=False)
            g_forward = torch.compile(g_forward, backend=compile_backend, dynamic=False)
        self._d_forward_fn: Callable = d_forward
        self._g_forward_fn: Callable = g_forward
        self._calls = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: dict[str, torch.Tensor | None] = {}

    # --- the pieces --------------------------------------------------------------------------------

    def _autocast(self):
        if self.precision == "bf16":
            # No weight-cast cache across a CUDA graph capture (casts must be recorded in it).
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not self.cuda_graphs)
        return contextlib.nullcontext()

    def _d_forward(self, real: torch.Tensor, y_real: torch.Tensor | None, z: torch.Tensor,
                   y_fake: torch.Tensor | None):
        batch = real.shape[0]
        with self._autocast():
            with torch.no_grad():
                fake = self.G_raw(z, y_fake)
            # Concatenate in the dtype D's first conv will cast to anyway (bf16 under autocast): the
            # same values (fake came out of bf16 convs), half the bytes.
            dtype = torch.bfloat16 if self.precision == "bf16" else real.dtype
            x = torch.cat([real.to(dtype), fake.to(dtype)])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.cat([y_real, y_fake]) if y_real is not None else None
            logits = self.D(x, y)
        d_real, d_fake = logits.float().split(batch)
        loss = hinge_loss_d(d_real, d_fake)
        return loss, d_real.detach().mean(), d_fake.detach().mean()

    def _g_forward(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        with self._autocast():
            logits = self.D_raw(self.G(z, y), y)
        return hinge_loss_g(logits)

    def _set_d_requires_grad(self, flag: bool) -> None:
        for p in self._D_params:
            p.requires_grad_(flag)

    def _eager_step(self, real: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The step, without syncs; returns the statistics stacked (4,) in STAT_NAMES order."""
        previous = set_check_finite(False)
        try:
            reals = real.chunk(self.d_steps)
            ys = y.chunk(self.d_steps) if y is not None else [None] * self.d_steps
            batch = reals[0].shape[0]
            for real_i, y_i in zip(reals, ys):
                z, y_fake = _sample_latents(batch, self.z_dim, self.n_classes, self.device)
                loss_d, d_real, d_fake = self._d_forward_fn(real_i, y_i, z, y_fake)
                self.opt_D.zero_grad(set_to_none=True)
                loss_d.backward()
                self.opt_D.step()
            z, y_g = _sample_latents(batch, self.z_dim, self.n_classes, self.device)
            self._set_d_requires_grad(False)
            try:
                loss_g = self._g_forward_fn(z, y_g)
                self.opt_G.zero_grad(set_to_none=True)
                loss_g.backward()
            finally:
                self._set_d_requires_grad(True)
            self.opt_G.step()
        finally:
            set_check_finite(previous)
        return torch.stack([loss_d.detach(), loss_g.detach(), d_real, d_fake])

    # --- the public face ---------------------------------------------------------------------------

    def _check_batch(self, real: torch.Tensor, y: torch.Tensor | None) -> None:
        if not isinstance(real, torch.Tensor) or real.ndim != 4 or not real.is_floating_point():
            shape = tuple(real.shape) if isinstance(real, torch.Tensor) else type(real).__name__
            raise ValueError(f"GANStep: real must be a float (B, C, H, W) tensor, got {shape}")
        if real.device != self.device:
            raise ValueError(f"GANStep: real is on {real.device} but the models are on {self.device}")
        if real.shape[0] % self.d_steps:
            raise ValueError(f"GANStep: d_steps={self.d_steps} needs a batch of d_steps x B images "
                             f"(one B per D step), got {real.shape[0]}")
        if (y is None) != (self.n_classes == 0):
            raise ValueError(f"GANStep: y must be {'None' if self.n_classes == 0 else 'given'} "
                             f"(n_classes={self.n_classes})")

    def __call__(self, real: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One iteration on ``real`` (``d_steps * B`` images, split in order among the D steps)."""
        self._check_batch(real, y)
        if self.cuda_graphs:
            stats = self._graphed_step(real, y)
        else:
            stats = self._eager_step(real, y)
        self._calls += 1
        return dict(zip(STAT_NAMES, stats.unbind()))

    def _graphed_step(self, real: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self._graph is None and self._calls < self.graph_warmup:
            # Warm-up on a side stream, as torch.cuda.graph asks: autotuners and lazy state run here.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                stats = self._eager_step(real, y)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return stats
        if self._graph is None:
            self._static = {"real": real.clone(), "y": y.clone() if y is not None else None}
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._static["stats"] = self._eager_step(self._static["real"], self._static["y"])
            self._graph = graph  # capture recorded the step without running it: replay below runs it
        else:
            self._static["real"].copy_(real)
            if y is not None:
                self._static["y"].copy_(y)
        self._graph.replay()
        # Replays move weights without bumping their version counters: make any later eager
        # training-mode forward re-run its power iteration instead of trusting a stale sigma.
        mark_weights_changed([self.G_raw, self.D_raw])
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


def make_gan_step(G: nn.Module, D: nn.Module, opt_G: torch.optim.Optimizer, opt_D: torch.optim.Optimizer,
                  *, precision: str = "bf16", channels_last: bool = True, compile: bool | None = None,
                  cuda_graphs: bool = False, d_steps: int = 1, **kwargs) -> GANStep:
    """The fast step as a callable ``step(real, y=None) -> dict of detached loss tensors``; see :class:`GANStep`."""
    return GANStep(G, D, opt_G, opt_D, precision=precision, channels_last=channels_last, compile=compile,
                   cuda_graphs=cuda_graphs, d_steps=d_steps, **kwargs)


__all__ = ["GANStep", "PRECISIONS", "STAT_NAMES", "make_gan_step"]
