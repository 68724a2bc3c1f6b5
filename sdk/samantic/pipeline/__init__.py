"""The grid-prompted segment-everything pipeline that every semantic head plugs into."""

from samantic.pipeline.amg import AutomaticMaskGenerator, MaskSet
from samantic.pipeline.config import AmgConfig
from samantic.pipeline.decoder import DecoderOutput, PromptMaskDecoder
from samantic.pipeline.scoring import MaskScorer, ScoredMasks

__all__ = [
    "AmgConfig",
    "AutomaticMaskGenerator",
    "DecoderOutput",
    "MaskScorer",
    "MaskSet",
    "PromptMaskDecoder",
    "ScoredMasks",
]
