"""Writing bundles: ONNX graphs, head, manifest with hashes (see :mod:`samantic.runtime.bundle` for the layout)."""

from __future__ import annotations

import datetime as _dt
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from samantic.runtime.bundle import BUNDLE_FORMAT, FORMAT_VERSION, MANIFEST, Bundle, BundleError, safe_relpath

# TensorRT optimization profiles of the dynamic dims (min, opt, max); B is the grid batch
DEFAULT_MAX_PROMPTS = 128


def default_profiles(max_prompts: int = DEFAULT_MAX_PROMPTS, multimask: int = 3) -> Dict[str, Dict[str, int]]:
    """Profiles over the prompts (B), points per prompt (N), upscaled prompts (U) and selected masks (K)."""
    opt = min(64, max_prompts)
    return {
        "B": {"min": 1, "opt": opt, "max": max_prompts},
        "N": {"min": 1, "opt": 2, "max": 8},
        "U": {"min": 1, "opt": opt, "max": max_prompts},
        "K": {"min": 1, "opt": opt, "max": max_prompts * multimask},
    }


def file_entry(path: Path) -> Dict[str, Any]:
    from samantic.models.weights import file_sha256

    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def write_manifest(root: Path, manifest: Dict[str, Any]) -> Path:
    """Hashes every referenced file into ``manifest["files"]`` and writes ``manifest.json`` atomically."""
    from samantic.io.atomic import atomic_write_json

    manifest = dict(manifest)
    bundle = Bundle(root, {**manifest, "files": {}})
    files = dict(manifest.get("files", {}))
    for rel in bundle.referenced_files():
        path = safe_relpath(root, rel)
        if not path.is_file():
            raise BundleError(f"{root}: cannot list {rel!r} in the manifest: no such file")
        if rel not in files or files[rel].get("size") != path.stat().st_size:
            files[rel] = file_entry(path)
    manifest["files"] = {k: files[k] for k in sorted(files) if k in set(bundle.referenced_files())}
    return atomic_write_json(root / MANIFEST, manifest, indent=2)


def _head_module(head: Union[str, Path, Any, None]):
    if head is None or hasattr(head, "forward"):
        return head
    from samantic.heads.usam import load_head

    return load_head(head)


def export_bundle(
    model: Union[str, Any],
    out: Union[str, Path],
    *,
    checkpoint: Optional[str] = None,
    head: Union[str, Path, Any, None] = None,
    int8: bool = True,
    torch_weights: bool = False,
    thresholds: Optional[Mapping[str, Any]] = None,
    max_prompts: int = DEFAULT_MAX_PROMPTS,
    overwrite: bool = False,
) -> Path:
    """Exports a model (and semantic head) into a bundle directory.

    Args:
        model: a registered model name, or a ``Sam`` built by :func:`samantic.models.create_model`.
        out: the bundle directory (created).
        checkpoint: weights for a named model (default: its shipped weights, else random init).
        head: a head file (``.safetensors`` from :meth:`UsamHead.save`) or a head module with ``info``.
        int8: also write onnxruntime dynamic-INT8 versions of the encoder and prompt graphs.
        torch_weights: also store the SAM weights (lets ``backend="torch"`` load the bundle).
        thresholds: generator defaults recorded in the manifest (``pred_iou_thresh``, ...).
        max_prompts: largest prompt batch of the TensorRT profiles.
        overwrite: replace an existing bundle in ``out``.

    Returns:
        The bundle directory.

    Raises:
        BundleError: ``out`` holds a bundle (or other files) and ``overwrite`` is False.
        ValueError: unknown model, a head trained for a different token size.
    """
    from samantic import __version__
    from samantic.export.onnx import GRAPHS, MULTIMASK, OPSET, PROMPTS, export_graph, quantize_int8
    from samantic.pipeline.config import AmgConfig

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise BundleError(f"{out}: exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        if not (out / MANIFEST).is_file():
            raise BundleError(f"{out}: not empty and not a bundle; refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    if isinstance(model, str):
        from samantic.models import create_model

        sam = create_model(model, checkpoint=checkpoint)
        model_id = model
    else:
        sam = model
        model_id = getattr(sam, "samantic_name", type(sam).__name__)
    head_mod = _head_module(head)
    token_dim = int(sam.mask_decoder.transformer_dim)
    if head_mod is not None and getattr(head_mod.info, "token_dim", token_dim) != token_dim:
        raise ValueError(f"the head reads {head_mod.info.token_dim}-d tokens, {model_id} makes {token_dim}-d tokens")

    graphs: Dict[str, Dict[str, str]] = {}
    for g in GRAPHS:
        export_graph(sam, g, out / f"{g}.onnx", head=head_mod if g == PROMPTS else None)
        graphs[g] = {"fp32": f"{g}.onnx"}
    if int8:
        for g in ("encoder", "prompts"):
            quantize_int8(out / f"{g}.onnx", out / f"{g}.int8.onnx")
            graphs[g]["int8"] = f"{g}.int8.onnx"

    head_entry = None
    if head_mod is not None:
        info = head_mod.info
        head_entry = {"classes": list(info.classes), "groups": {k: list(v) for k, v in info.groups.items()},
                      "score_thresh": float(info.score_thresh), "token_dim": int(info.token_dim),
                      "file": "head.safetensors", "in_graph": PROMPTS}
        if isinstance(head, (str, Path)):
            shutil.copyfile(head, out / "head.safetensors")
        else:
            head_mod.save(out / "head.safetensors")
    weights_entry = None
    if torch_weights:
        from samantic.models import save_checkpoint

        save_checkpoint(sam, out / "model.safetensors")
        weights_entry = {"file": "model.safetensors"}

    defaults = AmgConfig()
    thr = {k: getattr(defaults, k) for k in ("points_per_side", "points_per_batch", "pred_iou_thresh",
                                              "stability_score_thresh", "stability_score_offset", "box_nms_thresh")}
    from samantic.models import recommended_thresholds

    thr.update(recommended_thresholds(sam))  # the model's own (sam_nano's shipped weights), else segment-anything's
    thr.update(thresholds or {})
    pe = sam.prompt_encoder
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": FORMAT_VERSION,
        "samantic_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"id": model_id, "checkpoint": str(checkpoint) if checkpoint else None},
        "input": {
            "img_size": int(sam.image_encoder.img_size),
            "pixel_mean": [float(v) for v in sam.pixel_mean.flatten().tolist()],
            "pixel_std": [float(v) for v in sam.pixel_std.flatten().tolist()],
            "mask_threshold": float(sam.mask_threshold),
            "embedding": [int(pe.embed_dim), *(int(v) for v in pe.image_embedding_size)],
            "low_res": [4 * int(v) for v in pe.image_embedding_size],
            "multimask": MULTIMASK,
            "token_dim": token_dim,
        },
        "thresholds": thr,
        "head": head_entry,
        "torch_weights": weights_entry,
        "onnx": {"opset": OPSET},
        "graphs": graphs,
        "profiles": default_profiles(max_prompts, MULTIMASK),
        "engines": {},
    }
    write_manifest(out, manifest)
    return out
