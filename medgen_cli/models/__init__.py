"""Networks and their registry. Every model's forward is ``(x, t) -> y`` with ``t`` model time (B,).

Imports neither ``diffusion`` nor ``solvers`` (docs/ARCHITECTURE.md).
"""

from .dit import DiT, build_dit
from .registry import MODELS, build_model, count_parameters
from .unet import UNet, build_unet

__all__ = ["DiT", "MODELS", "build_dit", "UNet", "build_model", "build_unet", "count_parameters"]
