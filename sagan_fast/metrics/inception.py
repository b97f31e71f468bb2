"""Inception-v3 features for FID/KID/IS from a local weights file; nothing is ever downloaded.

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (the TensorFlow-FID-compatible
port torchmetrics uses as well). Its weights file is the one torch-fidelity and pytorch-fid fetch
on first use: ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity's name) or
``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's), the same state dict. Get it once on a
machine with internet access and pass its path (``--inception-weights PATH``).

The file is read with ``torch.load(weights_only=True)`` and checked before the network is built;
torch-fidelity gets the checked tensors (re-serialized in memory), never the file itself, which
it would unpickle without that protection.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ..inference import first_line

WEIGHTS_FILE_NAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
FEATURE_DIM = 2048
N_LOGITS = 1008  # the 2015 TensorFlow graph's classes (1000 + 8 unused)
# Two tensors whose presence and shape say "this is that Inception", checked before building it.
_SIGNATURE = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "fc.weight": (N_LOGITS, FEATURE_DIM)}


class MissingDependencyError(ImportError):
    """An optional package a metric needs is not installed (or does not import)."""


def check_weights_path(path: str | Path) -> Path:
    """``path`` if it is a file; else FileNotFoundError naming it and the file expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights {str(path)!r} do not exist: sagan_fast never downloads them; get "
            f"{WEIGHTS_FILE_NAMES[0]} (torch-fidelity's release file, the same as pytorch-fid's "
            f"{WEIGHTS_FILE_NAMES[1]}) once and pass its path")
    return path


def load_inception_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The Inception state dict in ``path``, checked; FileNotFoundError / ValueError naming it."""
    path = check_weights_path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: not a weights file
        raise ValueError(f"Inception weights {str(path)!r} are not a readable state dict "
                         f"({first_line(err)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Inception weights {str(path)!r}: expected a state dict of tensors "
                         f"({WEIGHTS_FILE_NAMES[0]}), got a {type(state).__name__} of other values")
    for key, shape in _SIGNATURE.items():
        if key not in state or tuple(state[key].shape) != shape:
            found = tuple(state[key].shape) if key in state else "missing"
            raise ValueError(f"Inception weights {str(path)!r} are not the FID Inception-v3 "
                             f"({WEIGHTS_FILE_NAMES[0]}): {key} should have shape {shape}, found {found}")
    return state


def _inception_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as err:  # not installed, or installed with a torchvision that does not load
        raise MissingDependencyError(
            "FID/KID/IS with Inception need torch-fidelity (pip install torch-fidelity, with the torchvision "
            f"that matches your torch); importing it failed: {first_line(err)}") from None
    return FeatureExtractorInceptionV3


class InceptionFeatures:
    """Images in [-1, 1] (B, 1 or 3, H, W) -> (2048-d pool features, 1008 unbiased logits), float64 CPU.

    Images are quantized to uint8 as a PNG would store them; torch-fidelity resizes them to 299 px
    the way TensorFlow's FID graph does. Grey images are repeated to three channels.
    """

    name = "inception"
    judges_classes = False  # 1008 ImageNet classes: IS yes, digit coverage no

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu",
                 batch_size: int = 50) -> None:
        state = load_inception_state_dict(weights_path)
        extractor_class = _inception_class()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        try:
            with torch.random.fork_rng(devices=[]):  # its random init must not move the caller's RNG
                net = extractor_class("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=buffer)
        except RuntimeError as err:  # load_state_dict: keys or shapes do not match
            raise ValueError(f"Inception weights {str(weights_path)!r} do not fit torch-fidelity's "
                             f"Inception-v3: {first_line(err)}") from None
        self.net = net.to(device).eval()
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features: expected (B, 1 or 3, H, W) images, "
                             f"got {tuple(images.shape)}")
        feats, logits = [], []
        for start in range(0, images.shape[0], self.batch_size):
            x = images[start:start + self.batch_size].to(self.device).float()
            x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            f, lg = self.net(x)
            feats.append(f.double().cpu())
            logits.append(lg.double().cpu())
        return torch.cat(feats), torch.cat(logits)
