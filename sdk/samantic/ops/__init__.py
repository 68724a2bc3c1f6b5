"""Typed Python front of the compiled kernels in ``samantic._C``.

Everything here takes numpy arrays (torch tensors are accepted and copied to
host memory) and returns numpy arrays, so the runtime path needs no torch.
RLEs are COCO-style dicts ``{"size": [h, w], "counts": ...}`` whose counts are
a list of ints (uncompressed, like segment-anything's ``mask_to_rle_pytorch``)
or a compressed ``str``/``bytes`` (like ``pycocotools.mask.encode``).
"""

from samantic.ops.fusion import FusionResult, panoptic_fusion
from samantic.ops.merge import MergedPatches, PatchGroups, merge_patches
from samantic.ops.nms import mask_nms, nms
from samantic.ops.postprocess import PostprocessResult, postprocess_masks
from samantic.ops.regions import remove_small_regions
from samantic.ops.rle import (
    RleBatch,
    rle_area,
    rle_compress,
    rle_decode,
    rle_decompress,
    rle_encode,
    rle_iou,
    rle_merge,
    rle_to_bbox,
)

__all__ = [
    "FusionResult",
    "MergedPatches",
    "PatchGroups",
    "PostprocessResult",
    "RleBatch",
    "mask_nms",
    "merge_patches",
    "nms",
    "panoptic_fusion",
    "postprocess_masks",
    "remove_small_regions",
    "rle_area",
    "rle_compress",
    "rle_decode",
    "rle_decompress",
    "rle_encode",
    "rle_iou",
    "rle_merge",
    "rle_to_bbox",
]
