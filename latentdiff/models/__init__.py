"""The denoiser: attention layers (`attention.py`), the conditional UNet (`unet.py`) and its ControlNet
(`controlnet.py`); diffusers' files for both (`unet_diffusers.py`)."""

from latentdiff.models.controlnet import ControlNetConfig, ControlNetModel
from latentdiff.models.unet import ConditionalUNet, UNetConfig

__all__ = ["ConditionalUNet", "ControlNetConfig", "ControlNetModel", "UNetConfig"]
