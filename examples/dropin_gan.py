"""Using sagan_fast's layers in your own GAN: a small DCGAN on scikit-learn's 8x8 digits.

Nothing here comes from sagan_fast.models: it is a plain DCGAN-style G and D where torch's
layers were swapped for ours (``spectral_norm``, ``SNConv2d``, ``SNLinear``, ``SelfAttention2d``).

    python examples/dropin_gan.py --steps 300
"""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from sagan_fast.nn import SelfAttention2d, SNConv2d, SNLinear, fuse_spectral_norms, spectral_norm


def make_generator(z_dim: int = 32, ch: int = 32) -> nn.Module:
    G = nn.Sequential(
        spectral_norm(nn.Linear(z_dim, 2 * ch * 4 * 4)), nn.Unflatten(1, (2 * ch, 4, 4)),
        nn.BatchNorm2d(2 * ch), nn.ReLU(),
        spectral_norm(nn.ConvTranspose2d(2 * ch, ch, 4, stride=2, padding=1)),  # 8x8
        nn.BatchNorm2d(ch), nn.ReLU(),
        SelfAttention2d(ch),                                                    # gamma starts at 0
        spectral_norm(nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1)),  # 16x16
        nn.BatchNorm2d(ch // 2), nn.ReLU(),
        SNConv2d(ch // 2, 1, 3, padding=1), nn.Tanh(),
    )
    return fuse_spectral_norms(G)  # optional: all SN weights of G power-iterated in one go


def make_discriminator(ch: int = 32) -> nn.Module:
    D = nn.Sequential(
        SNConv2d(1, ch, 3, padding=1), nn.LeakyReLU(0.1),
        SNConv2d(ch, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.1),       # 8x8
        SelfAttention2d(ch),
        SNConv2d(ch, 2 * ch, 4, stride=2, padding=1), nn.LeakyReLU(0.1),   # 4x4
        nn.Flatten(), SNLinear(2 * ch * 4 * 4, 1),
    )
    return fuse_spectral_norms(D)


def load_digits_16px() -> torch.Tensor:
    """The 1797 8x8 digits, scaled to [-1, 1] and upsampled to 16x16: (1797, 1, 16, 16)."""
    images = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 8 - 1
    return F.interpolate(images, size=16, mode="bilinear", align_corners=False)


def train(steps: int = 300, batch_size: int = 64, z_dim: int = 32, seed: int = 0):
    """Hinge loss, Adam(0, 0.9), TTUR. Returns G, D and the (d_loss, g_loss) of every step."""
    torch.manual_seed(seed)
    data = load_digits_16px()
    G, D = make_generator(z_dim), make_discriminator()
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=4e-4, betas=(0.0, 0.9))
    history = []
    for step in range(steps):
        real = data[torch.randint(len(data), (batch_size,))]
        fake = G(torch.randn(batch_size, z_dim))
        # D on real, then on fake, then one backward: fine with our SN (torch's raises here).
        d_loss = F.relu(1 - D(real)).mean() + F.relu(1 + D(fake.detach())).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = -D(G(torch.randn(batch_size, z_dim))).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        history.append((d_loss.item(), g_loss.item()))
    return G, D, history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    _, _, history = train(args.steps)
    for step in range(0, args.steps, max(args.steps // 10, 1)):
        print(f"step {step:5d}  d_loss {history[step][0]:.3f}  g_loss {history[step][1]:.3f}")
