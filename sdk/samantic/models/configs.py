"""Architecture configs: every number that shapes a SAM model, in one frozen dataclass.

This module is torch-free so that configs can be read, compared and written
(bundle manifests, checkpoint metadata) on an install without torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from typing import Any, Mapping, Tuple

__all__ = ["SamConfig"]

# ImageNet statistics in 0..255 RGB, as used by every official SAM checkpoint.
_IMAGENET_MEAN = (123.675, 116.28, 103.53)
_IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamConfig:
    """Architecture of a SAM model (image encoder, prompt encoder, mask decoder).

    The defaults are segment-anything's shared numbers (``build_sam.py``); the
    four encoder fields without a default are what tells vit_b, vit_l and
    vit_h apart.

    Attributes:
        encoder_embed_dim: Channel width of the ViT image encoder.
        encoder_depth: Number of ViT blocks.
        encoder_num_heads: Attention heads per ViT block.
        encoder_global_attn_indexes: Indexes of the blocks that use global
            attention; all other blocks use windowed attention.
        encoder_window_size: Side of the attention window of windowed blocks.
        encoder_mlp_ratio: Hidden width of a block's MLP, relative to
            ``encoder_embed_dim``.
        encoder_qkv_bias: Whether the attention projections have a bias.
        encoder_use_rel_pos: Whether attention adds relative position embeddings.
        encoder_norm_eps: Epsilon of the encoder's LayerNorms.
        img_size: Side of the square, padded encoder input in pixels.
        patch_size: Side of a ViT patch in pixels.
        prompt_embed_dim: Channel width shared by the encoder neck, the prompt
            encoder and the mask decoder.
        decoder_depth: Number of two-way transformer blocks in the mask decoder.
        decoder_mlp_dim: Hidden width of the decoder transformer's MLPs.
        decoder_num_heads: Attention heads in the decoder transformer.
        decoder_attention_downsample_rate: Channel downsampling of the decoder's
            token-to-image and image-to-token attention.
        num_multimask_outputs: Masks predicted per prompt in multimask mode.
        iou_head_depth: Layers of the MLP that predicts mask IoU.
        iou_head_hidden_dim: Hidden width of that MLP.
        mask_in_chans: Hidden channels of the prompt encoder's mask downscaler.
        pixel_mean: Per-channel RGB mean (0..255) subtracted before the encoder.
        pixel_std: Per-channel RGB std (0..255) the input is divided by.
        encoder_type: ``"vit"`` (segment-anything's ``ImageEncoderViT``) or ``"conv"``
            (:class:`samantic.models.encoders.ConvImageEncoder`: a convolutional pyramid
            with ``encoder_depth`` global-attention blocks of ``encoder_num_heads`` heads
            at stride 32, its output stride being ``patch_size``; ``encoder_embed_dim``
            and the window/rel-pos fields are then unused).
        encoder_widths: channels of the conv encoder at strides 4, 8, 16, 32.
        encoder_blocks: blocks of the conv encoder at strides 4, 8, 16, 32.
    """

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: Tuple[int, ...]
    encoder_window_size: int = 14
    encoder_mlp_ratio: float = 4.0
    encoder_qkv_bias: bool = True
    encoder_use_rel_pos: bool = True
    encoder_norm_eps: float = 1e-6
    img_size: int = 1024
    patch_size: int = 16
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    decoder_attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    pixel_mean: Tuple[float, float, float] = _IMAGENET_MEAN
    pixel_std: Tuple[float, float, float] = _IMAGENET_STD
    encoder_type: str = "vit"
    encoder_widths: Tuple[int, ...] = ()
    encoder_blocks: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Lists arrive from JSON and from user overrides; store tuples so the
        # config stays hashable and truly immutable.
        for name in ("encoder_global_attn_indexes", "pixel_mean", "pixel_std", "encoder_widths", "encoder_blocks"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                try:
                    object.__setattr__(self, name, tuple(value))
                except TypeError:
                    raise ValueError(f"{name} must be a sequence, got {value!r}") from None
        self._validate()

    def _validate(self) -> None:
        positive = (
            "encoder_embed_dim",
            "encoder_depth",
            "encoder_num_heads",
            "img_size",
            "patch_size",
            "prompt_embed_dim",
            "decoder_depth",
            "decoder_mlp_dim",
            "decoder_num_heads",
            "decoder_attention_downsample_rate",
            "num_multimask_outputs",
            "iou_head_depth",
            "iou_head_hidden_dim",
            "mask_in_chans",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.encoder_window_size < 0:
            raise ValueError(
                f"encoder_window_size must be >= 0 (0 = global attention everywhere), "
                f"got {self.encoder_window_size!r}"
            )
        if self.encoder_mlp_ratio <= 0:
            raise ValueError(f"encoder_mlp_ratio must be > 0, got {self.encoder_mlp_ratio!r}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size must be a multiple of patch_size, got img_size={self.img_size} "
                f"and patch_size={self.patch_size}"
            )
        if self.encoder_type not in ("vit", "conv"):
            raise ValueError(f"encoder_type must be 'vit' or 'conv', got {self.encoder_type!r}")
        if self.encoder_type == "conv":
            if len(self.encoder_widths) != 4 or len(self.encoder_blocks) != 4:
                raise ValueError(
                    "a conv encoder needs 4 encoder_widths and 4 encoder_blocks (strides 4, 8, 16, 32), "
                    f"got {self.encoder_widths} and {self.encoder_blocks}"
                )
            if any(not isinstance(v, int) or v <= 0 for v in self.encoder_widths) or any(
                not isinstance(v, int) or v < 0 for v in self.encoder_blocks
            ):
                raise ValueError(f"encoder_widths must be positive and encoder_blocks >= 0, got "
                                 f"{self.encoder_widths} and {self.encoder_blocks}")
            if self.patch_size not in (8, 16):
                raise ValueError(f"a conv encoder's patch_size (output stride) must be 8 or 16, got {self.patch_size}")
            if self.img_size % 32:
                raise ValueError(f"a conv encoder's img_size must be a multiple of 32, got {self.img_size}")
            _check_divides("encoder_num_heads", self.encoder_num_heads, "encoder_widths[3]", self.encoder_widths[3])
        elif self.encoder_widths or self.encoder_blocks:
            raise ValueError("encoder_widths and encoder_blocks apply to encoder_type='conv' only")
        else:
            _check_divides("encoder_num_heads", self.encoder_num_heads, "encoder_embed_dim", self.encoder_embed_dim)
        _check_divides("decoder_num_heads", self.decoder_num_heads, "prompt_embed_dim", self.prompt_embed_dim)
        # The decoder upscales to prompt_embed_dim // 8 channels and the
        # positional encoding splits the width in two sin/cos halves.
        if self.prompt_embed_dim % 8:
            raise ValueError(f"prompt_embed_dim must be a multiple of 8, got {self.prompt_embed_dim}")
        if (self.prompt_embed_dim // self.decoder_attention_downsample_rate) % self.decoder_num_heads:
            raise ValueError(
                "prompt_embed_dim // decoder_attention_downsample_rate must be divisible by "
                f"decoder_num_heads, got {self.prompt_embed_dim} // "
                f"{self.decoder_attention_downsample_rate} and {self.decoder_num_heads}"
            )
        # The mask downscaler's first conv has mask_in_chans // 4 channels.
        if self.mask_in_chans % 4:
            raise ValueError(f"mask_in_chans must be a multiple of 4, got {self.mask_in_chans}")
        bad = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if bad:
            raise ValueError(
                f"encoder_global_attn_indexes must lie in [0, encoder_depth={self.encoder_depth}), "
                f"got {self.encoder_global_attn_indexes} (bad: {bad})"
            )
        for name in ("pixel_mean", "pixel_std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"{name} must have 3 values (R, G, B), got {value!r}")
        if any(s <= 0 for s in self.pixel_std):
            raise ValueError(f"pixel_std must be > 0, got {self.pixel_std!r}")

    @property
    def image_embedding_size(self) -> int:
        """Side of the image embedding grid (``img_size // patch_size``)."""
        return self.img_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution mask logits (4x the embedding side)."""
        return 4 * self.image_embedding_size

    def replace(self, **changes: Any) -> "SamConfig":
        """Returns a copy with some fields changed.

        Raises:
            ValueError: If a name is not a field (close matches are listed) or
                the new values do not form a valid architecture.
        """
        _check_field_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Returns the fields as a JSON-ready dict (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """Returns the config as a compact, key-sorted JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SamConfig":
        """Builds a config from :meth:`to_dict` output.

        Raises:
            ValueError: On unknown or missing fields, or invalid values.
        """
        _check_field_names(data)
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data and f.default is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"SamConfig is missing required fields: {', '.join(missing)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "SamConfig":
        """Builds a config from :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"SamConfig JSON is not valid: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"SamConfig JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)


def _check_divides(div_name: str, div: int, name: str, value: int) -> None:
    if value % div:
        raise ValueError(f"{name} must be divisible by {div_name}, got {name}={value} and {div_name}={div}")


def _check_field_names(names) -> None:
    fields = [f.name for f in dataclasses.fields(SamConfig)]
    for name in names:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(f"SamConfig has no field {name!r}.{hint} Fields: {', '.join(fields)}")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
