"""Drop-in layers for any GAN: spectral norm, SN layers, self-attention, conditional BN."""

from .spectral_norm import (SpectralNorm, SpectralNormError, assert_normalized, check_spectral_norms,
                            convert_hook_spectral_norm_state_dict, fuse_spectral_norms,
                            load_spectral_norm_state, mark_weights_changed, normalized_sigmas,
                            power_iteration_residuals, set_check_finite, spectral_norm, spectral_norm_layers,
                            spectral_norm_sigmas, spectral_norm_state, spectral_norm_update_counts,
                            update_spectral_norms)

__all__ = [
    "SpectralNorm", "SpectralNormError", "assert_normalized", "check_spectral_norms",
    "convert_hook_spectral_norm_state_dict", "fuse_spectral_norms", "load_spectral_norm_state",
    "mark_weights_changed", "normalized_sigmas", "power_iteration_residuals", "set_check_finite",
    "spectral_norm", "spectral_norm_layers",
    "spectral_norm_sigmas", "spectral_norm_state", "spectral_norm_update_counts", "update_spectral_norms",
]

from .attention import SelfAttention2d  # noqa: E402

__all__ += ["SelfAttention2d"]

from .layers import (ConditionalBatchNorm2d, SNConv2d, SNConvTranspose2d, SNEmbedding,  # noqa: E402
                     SNLinear)

__all__ += ["ConditionalBatchNorm2d", "SNConv2d", "SNConvTranspose2d", "SNEmbedding", "SNLinear"]
