"""The denoiser: attention layers (`attention.py`) and the conditional UNet (`unet.py`)."""

from latentdiff.models.unet import ConditionalUNet, UNetConfig

__all__ = ["ConditionalUNet", "UNetConfig"]
