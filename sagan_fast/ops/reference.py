"""Plain-PyTorch references: the ground truth every kernel is tested and benchmarked against.

Nothing here is fused or clever on purpose. Tests import these (computed in float64) and so do the
benchmarks, so there is exactly one copy of the math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import accumulation_dtype


# --------------------------------------------------------------------------------------------
# Spectral norm: the semantics of torch.nn.utils.parametrizations.spectral_norm
# --------------------------------------------------------------------------------------------

def default_spectral_norm_dim(module: torch.nn.Module) -> int:
    """torch's rule: dim 1 for transposed convolutions (weight is (in, out, ...)), else 0."""
    transposed = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    return 1 if isinstance(module, transposed) else 0


def weight_to_matrix(weight: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """(out, rest) matrix of a weight: ``dim`` moved to the front, the rest flattened (as torch)."""
    if weight.ndim <= 1:
        raise ValueError(f"expected a weight with more than 1 dimension, got shape {tuple(weight.shape)}")
    dim = dim % weight.ndim
    if dim != 0:
        weight = weight.permute(dim, *(d for d in range(weight.ndim) if d != dim))
    return weight.flatten(1)


def matrix_to_weight_shape(mat: torch.Tensor, weight_shape, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`weight_to_matrix` for a matrix shaped like the weight's matrix."""
    ndim = len(weight_shape)
    dim = dim % ndim
    perm = (dim, *(d for d in range(ndim) if d != dim))
    permuted_shape = [weight_shape[d] for d in perm]
    inverse = [perm.index(d) for d in range(ndim)]
    return mat.reshape(permuted_shape).permute(inverse)


@torch.no_grad()
def spectral_norm_power_iteration(weight_mat: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                                  n_power_iterations: int = 1, eps: float = 1e-12):
    """torch's update order: ``u = normalize(W v)`` then ``v = normalize(W^T u)``, n times.

    Out of place: returns the new (u, v); eps floors the norm as in ``F.normalize``.
    """
    for _ in range(n_power_iterations):
        u = F.normalize(torch.mv(weight_mat, v), dim=0, eps=eps)
        v = F.normalize(torch.mv(weight_mat.H, u), dim=0, eps=eps)
    return u, v


def spectral_norm_sigma(weight_mat: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sigma = u . (W v): differentiable in W, with u and v constants."""
    return torch.vdot(u, torch.mv(weight_mat, v))


def spectral_norm(weight: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None, *,
                  dim: int = 0, n_power_iterations: int = 1, eps: float = 1e-12,
                  training: bool = True):
    """One evaluation of torch's spectral-norm parametrization.

    Returns ``(w_sn, u, v, sigma)``: the normalized weight (differentiable in ``weight``; u and v
    are constants for autograd), the u and v after the power iteration (the inputs themselves in
    eval mode) and sigma. 1-D weights are normalized exactly, as torch does; u, v are then unused.
    """
    if weight.ndim == 1:
        w_sn = F.normalize(weight, dim=0, eps=eps)
        return w_sn, u, v, weight.detach().norm().clamp_min(eps)
    weight_mat = weight_to_matrix(weight, dim)
    if training:
        u, v = spectral_norm_power_iteration(weight_mat.detach(), u, v, n_power_iterations, eps)
    sigma = spectral_norm_sigma(weight_mat, u, v)
    return weight / sigma, u, v, sigma.detach()


def spectral_norm_backward(grad_w_sn: torch.Tensor, w_sn: torch.Tensor, u: torch.Tensor,
                           v: torch.Tensor, sigma: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """dL/dW = (G - <G, W_sn> u v^T) / sigma, G = dL/dW_sn, u and v constant (closed form)."""
    inner = (grad_w_sn * w_sn).sum()
    uvT = matrix_to_weight_shape(torch.outer(u, v), w_sn.shape, dim)
    return (grad_w_sn - inner * uvT) / sigma


def spectral_norm_normalize_grad(grad_w_sn: torch.Tensor, weight: torch.Tensor, u: torch.Tensor,
                                 v: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """dL/dW of ``W / (u . W v)`` (u, v constant) from G = dL/dW_sn, in plain ops autograd can
    differentiate again (sigma recomputed from ``weight``, in float32 at least), in the weight's
    dtype: what the kernels' backward runs when the backward is itself differentiated
    (``create_graph=True``: double backward, Hessian-vector products). Real weights."""
    acc = accumulation_dtype(weight.dtype)
    w, u, v = weight.to(acc), u.detach().to(acc), v.detach().to(acc)
    sigma = spectral_norm_sigma(weight_to_matrix(w, dim), u, v)
    return spectral_norm_backward(grad_w_sn.to(acc), w / sigma, u, v, sigma, dim).to(weight.dtype)


# --------------------------------------------------------------------------------------------
# SAGAN attention
# --------------------------------------------------------------------------------------------

def sagan_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """out[b, i] = sum_j softmax_j(scale * q[b, i] . k[b, j]) v[b, j].

    q (B, N, E), k (B, Nk, E), v (B, Nk, Ev) -> (B, N, Ev). SAGAN uses no 1/sqrt(E) scale.
    The naive form: it builds the (B, N, Nk) matrix, in the inputs' dtype.
    """
    return torch.bmm(sagan_attention_weights(q, k, scale), v)


def sagan_attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The (B, N, Nk) attention map softmax_j(scale * q[b, i] . k[b, j]) (rows sum to 1)."""
    scores = torch.bmm(q, k.transpose(1, 2))
    if scale != 1.0:
        scores = scores * scale
    return torch.softmax(scores, dim=-1)


def sagan_attention_lse(q: torch.Tensor, k: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Natural-log logsumexp of each query row's scores, (B, N): what flash-style kernels store."""
    return torch.logsumexp(torch.bmm(q, k.transpose(1, 2)) * scale, dim=-1)


def self_attention_2d(x: torch.Tensor, w_query: torch.Tensor, w_key: torch.Tensor,
                      w_value: torch.Tensor, gamma: torch.Tensor, w_out: torch.Tensor | None = None,
                      pool_keys: bool = False) -> torch.Tensor:
    """SAGAN block on a feature map: y = x + gamma * out_conv(attention(f, g, h)).

    x (B, C, H, W); w_* are 1x1 conv weights (out, in, 1, 1) already spectrally normalized; no
    biases (as SAGAN / BigGAN). With ``pool_keys`` keys and values are 2x2 max-pooled (BigGAN form).
    """
    B, C, H, W = x.shape
    f = F.conv2d(x, w_query)
    g = F.conv2d(x, w_key)
    h = F.conv2d(x, w_value)
    if pool_keys:
        g = F.max_pool2d(g, 2)
        h = F.max_pool2d(h, 2)
    q = f.flatten(2).transpose(1, 2)          # (B, N, E)
    k = g.flatten(2).transpose(1, 2)          # (B, Nk, E)
    v = h.flatten(2).transpose(1, 2)          # (B, Nk, Ev)
    o = sagan_attention(q, k, v)              # (B, N, Ev)
    o = o.transpose(1, 2).reshape(B, -1, H, W)
    if w_out is not None:
        o = F.conv2d(o, w_out)
    return x + gamma * o
