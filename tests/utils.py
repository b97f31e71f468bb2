"""Shared test helpers: skip markers, error reports, tolerance rules."""

from __future__ import annotations

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def assert_close_report(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                        name: str = "tensor") -> None:
    """assert_close that says where values differ, NaN and Inf included."""
    actual_d, expected_d = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual_d.shape == expected_d.shape, f"{name}: shape {tuple(actual_d.shape)} != {tuple(expected_d.shape)}"
    nonfinite = ~torch.isfinite(actual_d) & torch.isfinite(expected_d)
    assert not nonfinite.any(), (f"{name}: {int(nonfinite.sum())} non-finite values where the reference is "
                                 f"finite, first at index {tuple(nonfinite.nonzero()[0].tolist())}")
    err = (actual_d - expected_d).abs()
    bound = atol + rtol * expected_d.abs()
    bad = err > bound
    if bad.any():
        idx = tuple(int(i) for i in torch.unravel_index((err - bound).flatten().argmax(), err.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} values outside atol={atol:g}, rtol={rtol:g}; "
            f"max abs err {err.max().item():.3g}; worst at {idx}: got {actual_d[idx].item():.6g}, "
            f"expected {expected_d[idx].item():.6g}")


def assert_within_factor_of_torch(ours: torch.Tensor, torch_same_dtype: torch.Tensor, ref_fp64: torch.Tensor,
                                  *, factor: float = 2.0, floor: float = 0.0, name: str = "tensor") -> None:
    """flash-attention's rule: |ours - ref| <= factor * |torch_lowp - ref| (+ a floor for exact cases)."""
    ours_err = max_abs_err(ours, ref_fp64)
    torch_err = max_abs_err(torch_same_dtype, ref_fp64)
    assert ours_err <= factor * torch_err + floor, (
        f"{name}: max error vs float64 {ours_err:.3g} > {factor} x PyTorch's own error {torch_err:.3g}"
        f" + {floor:g}")
