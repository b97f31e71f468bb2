"""Exponential moving average of the generator's weights; the averaged copy makes the samples."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema = d * ema + (1 - d) * weights`` per step from ``start``; a plain copy up to it.

    ``d = min(decay, (1 + n) / (10 + n))``, n the steps since ``start`` (TensorFlow's
    ExponentialMovingAverage warm-up): early on the average forgets the random init quickly, so
    samples of a short run are not dominated by it; later ``d = decay``.

    Parameters are averaged; buffers (SN u and v, BN running statistics) are copied, so the averaged
    model evaluates with the live model's statistics (as BigGAN-PyTorch does). The copy stays in eval
    mode and never needs gradients.
    """

    def __init__(self, model: nn.Module, decay: float, start: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.start = decay, start
        self.source = model
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # Matched by name once, so update() is two multi-tensor ops and a buffer copy.
        src_params, src_buffers = dict(model.named_parameters()), dict(model.named_buffers())
        self._params = [(p, src_params[k]) for k, p in self.model.named_parameters()]
        self._buffers = [(b, src_buffers[k]) for k, b in self.model.named_buffers()]

    def decay_at(self, step: int) -> float:
        n = step - self.start
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after each generator optimizer step; ``step`` counts the G steps done (1-based)."""
        ema_p = [e for e, _ in self._params]
        src_p = [s.detach() for _, s in self._params]
        if step <= self.start:
            torch._foreach_copy_(ema_p, src_p)
        else:
            torch._foreach_lerp_(ema_p, src_p, 1.0 - self.decay_at(step))
        for e, s in self._buffers:
            e.copy_(s)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
