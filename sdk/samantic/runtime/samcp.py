"""SAM-CP on onnxruntime (torch-free): a bundle's backbone, patch-encoder and decoder graphs.

:class:`OnnxSamcpScorer` gives what the torch head gives
(:class:`samantic.pipeline.panoptic.TorchSamcpScorer`): for one image and its patches,
the last decoder layer's affinities, class probabilities and presence. Image resize
and the patch masks inside their boxes are computed in numpy
(:mod:`samantic.pipeline.samcp_inputs`, the same numbers as the torch head); the
class queries (learned, or projected text embeddings) come from the bundle, so no
text encoder runs here. :class:`samantic.pipeline.panoptic.SamcpPredictor` then
merges (``samantic._C``) and fuses exactly as on torch.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from samantic.pipeline.panoptic import check_names
from samantic.pipeline.samcp_inputs import head_boxes, resize_image, roi_align_masks
from samantic.runtime.bundle import Bundle, BundleError

GRAPHS = ("samcp_backbone", "samcp_patches", "samcp_decoder")


def read_queries(bundle: Bundle) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(class queries ``[C, D]``, text embeddings ``[C, T]`` or None) stored in a bundle."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    entry = bundle.manifest["samcp"]
    path = bundle.path(entry["queries"])
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{path}: cannot read the SAM-CP class queries ({e})") from None
    q = tensors.get("class_queries")
    names = list(entry["classes"]) + list(entry["stuff"])
    if q is None or q.ndim != 2 or q.shape[0] != len(names):
        raise BundleError(f"{path}: class_queries must be [{len(names)}, D] (one per class of the manifest), "
                          f"got {None if q is None else q.shape}")
    return np.ascontiguousarray(q, np.float32), tensors.get("text_embeddings")


class OnnxSamcpScorer:
    """Runs a bundle's SAM-CP graphs on onnxruntime.

    Args:
        bundle: a loaded bundle with a ``samcp`` section.
        device, threads, providers: as for :class:`~samantic.runtime.onnxruntime.OnnxRuntimeEngine`.
    """

    backend = "onnxruntime"

    def __init__(self, bundle: Bundle, device: str = "auto", threads: Optional[int] = None,
                 providers: Optional[Sequence[Any]] = None) -> None:
        from samantic.runtime.onnxruntime import import_onnxruntime, select_providers, session_options

        entry = bundle.manifest.get("samcp")
        if not entry:
            raise BundleError(f"{bundle.root}: the bundle has no SAM-CP head (export it with --samcp)")
        ort = import_onnxruntime()
        self.bundle = bundle
        self.classes = tuple(entry["classes"])
        self.stuff = tuple(entry["stuff"])
        self.names = self.classes + self.stuff
        self.things = len(self.classes)
        self.model = entry.get("model") or ""
        self.input_size = int(entry["input_size"])
        self.roi_size = int(entry["roi_size"])
        self.mask_size = int(entry.get("mask_size", self.roi_size))  # bundles before mask_size: the RoI grid
        self.queries, self.text_embeddings = read_queries(bundle)
        self.inference = dict(entry.get("inference") or {})  # tuned options (samantic samcp tune)
        options = session_options(ort, threads)
        self.sessions = {}
        for g in GRAPHS:
            chosen = providers if providers is not None else select_providers(device, ort.get_available_providers())
            self.sessions[g] = ort.InferenceSession(str(bundle.graph(g, "fp32")), sess_options=options,
                                                    providers=list(chosen))
        self.providers = self.sessions[GRAPHS[0]].get_providers()
        self.timings: Dict[str, float] = {}

    def patch_options(self) -> Dict[str, Any]:
        return dict(self.bundle.manifest["samcp"].get("patches") or {})

    def check_classes(self, names: Sequence[str]) -> Tuple[str, ...]:
        return check_names(self.names, names, f"the SAM-CP head of {self.bundle.root}")

    def scores(self, image: np.ndarray, patch_rles: Any, patch_boxes: np.ndarray):
        """(affinity sigmoid ``[C + P, P]``, class probabilities ``[P, C]``, presence ``[C]``) as numpy."""
        import time

        c = len(self.names)
        p = len(patch_rles)
        if p == 0:
            return np.zeros((c, 0), np.float32), np.zeros((0, c), np.float32), np.zeros(c, np.float32)
        t0 = time.perf_counter()
        x, (sx, sy) = resize_image(image, self.input_size)
        feats = self.sessions["samcp_backbone"].run(None, {"image": x})
        t1 = time.perf_counter()
        boxes = head_boxes(patch_boxes)
        roi = roi_align_masks(patch_rles, boxes, self.mask_size)
        scaled = (boxes * np.array([sx, sy, sx, sy], np.float32)).astype(np.float32)
        feeds = {f"feat{i}": f for i, f in enumerate(feats)}
        feeds.update({"boxes": scaled, "roi_masks": roi,
                      "image_hw": np.array(x.shape[-2:], np.float32)})
        tokens, pos = self.sessions["samcp_patches"].run(None, feeds)
        t2 = time.perf_counter()
        aff, cls, presence = self.sessions["samcp_decoder"].run(
            None, {"tokens": tokens, "pos": pos, "class_queries": self.queries})
        t3 = time.perf_counter()
        self.timings = {"backbone": t1 - t0, "patch_encoder": t2 - t1, "decoder": t3 - t2}
        return aff, cls, presence
