"""The Next-DiT model library: pure PyTorch (no Ray). Networks, RoPE, attention, flow matching, encoders, checkpoints."""

from models.nextdit import ContextDrop, NextDiT
from models.presets import PRESETS, NextDiTConfig, preset
from models.rope import RopeScaling

__all__ = ["NextDiT", "NextDiTConfig", "PRESETS", "preset", "RopeScaling", "ContextDrop"]
