"""The two networks: the KL autoencoder and the conditional U-Net (diffusers state-dict compatible)."""
from carrara.models.autoencoder import AutoencoderKL, DiagonalGaussian
from carrara.models.blocks import count_parameters
from carrara.models.config import AutoencoderConfig, UNetConfig, default_autoencoder_config, default_unet_config
from carrara.models.unet import UNet2DConditionModel

__all__ = [
    "AutoencoderConfig", "AutoencoderKL", "DiagonalGaussian", "UNet2DConditionModel", "UNetConfig",
    "count_parameters", "default_autoencoder_config", "default_unet_config",
]
