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


def samcp_profiles(head: Any, max_patches: int = 512) -> Dict[str, Dict[str, int]]:
    """Profiles of a SAM-CP head's dynamic dims: image side (H, W) up to its input size, the feature
    maps of each FPN level (H0..W3), patches (P) and classes (C)."""
    size = int(head.info.input_size) or 1024
    low = 32

    def level(n: int, i: int) -> int:  # two stride-2 stem convs, then a stride-2 conv per stage
        for _ in range(i + 2):
            n = (n - 1) // 2 + 1
        return n

    c = int(head.info.num_classes)
    out = {"H": {"min": low, "opt": size * 3 // 4, "max": size}, "W": {"min": low, "opt": size, "max": size},
           "P": {"min": 1, "opt": 64, "max": max_patches}, "C": {"min": 1, "opt": c, "max": max(c, 256)}}
    for i in range(4):
        for ax in ("H", "W"):
            out[f"{ax}{i}"] = {k: level(v, i) for k, v in out[ax].items()}
    return out


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
    samcp: Union[str, Path, Any, None] = None,
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
        samcp: a SAM-CP head (file or :class:`~samantic.heads.samcp.SamcpHead`): its backbone,
            patch-encoder and decoder graphs, class queries, vocabulary and the patch grid and
            thresholds it was trained with (which become the bundle's segment-everything defaults).

    Returns:
        The bundle directory.

    Raises:
        BundleError: ``out`` holds a bundle (or other files) and ``overwrite`` is False.
        ValueError: unknown model, a head trained for a different token size.
    """
    from samantic import __version__
    from samantic.export.onnx import GRAPHS, MULTIMASK, OPSET, PROMPTS, export_graph, quantize_int8
    from samantic.models.tasks import TASKS
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
    samcp_mod = None
    if samcp is not None:
        if head_mod is not None:
            raise ValueError("a bundle takes a U-SAM head (head=) or a SAM-CP head (samcp=), not both")
        from samantic.heads.samcp import SamcpHead, load_samcp

        samcp_mod = samcp if isinstance(samcp, SamcpHead) else load_samcp(samcp)
        trained_on = samcp_mod.info.model
        if trained_on and trained_on != model_id:
            raise ValueError(f"{samcp if isinstance(samcp, (str, Path)) else 'the SAM-CP head'}: trained on patches of "
                             f"{trained_on}, not {model_id}")
        mismatch = samcp_mod.check_weights(sam, samcp if isinstance(samcp, (str, Path)) else "the SAM-CP head")
        if mismatch:
            import warnings

            from samantic.pipeline.panoptic import SamcpWeightsWarning

            warnings.warn(mismatch, SamcpWeightsWarning, stacklevel=2)
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
    samcp_entry = None
    if samcp_mod is not None:
        from samantic.export.samcp import export_samcp, samcp_manifest_entry

        for g, path in export_samcp(samcp_mod, out).items():
            if g != "queries":
                graphs[g] = {"fp32": path.name}
        if isinstance(samcp, (str, Path)):
            shutil.copyfile(samcp, out / "samcp.safetensors")
        else:
            samcp_mod.save(out / "samcp.safetensors")
        samcp_entry = samcp_manifest_entry(samcp_mod, "samcp.safetensors", "samcp_queries.safetensors")
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
    if samcp_entry is not None:
        # the patches the SAM-CP head was trained on (at segment-anything's box NMS unless they record one)
        thr.update({"box_nms_thresh": defaults.box_nms_thresh, **samcp_entry["patches"]})
    thr.update(thresholds or {})
    # per-task thresholds the weights file recorded (the "unspecified" ones are in thr already); explicit
    # thresholds= and a SAM-CP head's patch thresholds override them all
    overridden = samcp_entry is not None or any(k in (thresholds or {}) for k in ("pred_iou_thresh",
                                                                                 "stability_score_thresh"))
    task_thr = {} if overridden else {t: dict(v) for t, v in (getattr(sam, "samantic_task_thresholds", None) or
                                                              {}).items() if t != "unspecified"}
    if weights_entry is not None:
        # the weights' own calibration travels in their header too, so that `segment --checkpoint model.safetensors`
        # keeps what the model would (the shipped sam_nano's registry thresholds, a file's recorded ones)
        from samantic.models import record_thresholds, thresholds_source

        own, source = thresholds_source(sam)
        if source != "segment-anything":
            record_thresholds(out / "model.safetensors", own, source=f"{source} thresholds of {model_id}")
            for t, v in (getattr(sam, "samantic_task_thresholds", None) or {}).items():
                if t != "unspecified":
                    record_thresholds(out / "model.safetensors", v, t)
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
        **({"task_thresholds": task_thr} if task_thr else {}),
        "tasks": list(TASKS),  # SUM's task prompts: the prompts graph's ``task`` input indexes this list
        "head": head_entry,
        "samcp": samcp_entry,
        "torch_weights": weights_entry,
        "onnx": {"opset": OPSET},
        "graphs": graphs,
        "profiles": {**default_profiles(max_prompts, MULTIMASK),
                     **(samcp_profiles(samcp_mod) if samcp_mod is not None else {})},
        "engines": {},
    }
    write_manifest(out, manifest)
    return out
