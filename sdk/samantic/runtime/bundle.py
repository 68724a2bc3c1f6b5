"""Reading a bundle: the directory that ``samantic export bundle`` writes and the runtime loads (torch-free).

Layout::

    manifest.json         format, versions, model id, input size and normalisation, mask threshold,
                          thresholds, SUM task names, head classes and groups, graphs, TensorRT
                          profiles and engines, and every file with its SHA-256 and size
    encoder.onnx          image encoder (fp32), encoder.int8.onnx (onnxruntime dynamic INT8)
    prompts.onnx          prompt encoder + transformer (+ semantic head), prompts.int8.onnx; its
                          ``task`` input indexes the manifest's ``tasks`` (bundles from before task
                          prompts have neither and run task "unspecified" only)
    upscale.onnx          upscaling + hypernetworks of the selected masks
    head.safetensors      the semantic head (optional), model.safetensors (optional, torch backend)
    samcp_*.onnx          a SAM-CP head (optional): backbone, patch encoder, affinity decoder graphs,
                          samcp_queries.safetensors (class queries), samcp.safetensors (the torch head)
    engines/<key>/...     TensorRT engines, keyed by GPU, TensorRT version and precision

:meth:`Bundle.load` checks that every path stays inside the bundle and that
every file exists with its recorded size and SHA-256; errors name the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Tuple, Union

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "samantic.bundle"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")


class BundleError(ValueError):
    """A bundle is missing, malformed, tampered with or does not fit the request."""


def safe_relpath(root: Path, rel: str, what: str = "file") -> Path:
    """Resolves ``rel`` under ``root``; refuses absolute paths, ``..`` and symlinks that lead outside."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{root / MANIFEST}: {what} path must be a non-empty string, got {rel!r}")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or "\\" in rel or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise BundleError(f"{root / MANIFEST}: {what} path {rel!r} escapes the bundle directory")
    path = (root / pure).resolve()
    base = root.resolve()
    if path != base and base not in path.parents:
        raise BundleError(f"{root / MANIFEST}: {what} path {rel!r} resolves to {path}, outside the bundle directory")
    return path


@dataclass
class Bundle:
    """A loaded (and verified) bundle.

    Attributes:
        root: the bundle directory.
        manifest: the parsed ``manifest.json``.
    """

    root: Path
    manifest: Dict[str, Any]

    @staticmethod
    def load(path: Union[str, Path], verify: bool = True) -> "Bundle":
        """Reads ``manifest.json`` and (by default) verifies every file it lists.

        Raises:
            BundleError: no such directory or manifest, unknown format, a path outside
                the bundle, a missing file, or a file whose size or SHA-256 differs.
        """
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"{root}: no such bundle directory")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{mpath}: missing; not a samantic bundle (create one with `samantic export bundle`)")
        try:
            manifest = json.loads(mpath.read_text("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{mpath}: not a samantic bundle manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"{mpath}: bundle format version {version!r}, this samantic reads {FORMAT_VERSION}")
        for key in ("model", "input", "files", "graphs"):
            if key not in manifest:
                raise BundleError(f"{mpath}: the manifest has no {key!r} section")
        bundle = Bundle(root, manifest)
        for rel in bundle.referenced_files():
            if rel not in manifest["files"]:
                raise BundleError(f"{mpath}: {rel!r} is used but not listed (with its SHA-256) under 'files'")
        for rel in manifest["files"]:
            safe_relpath(root, rel)
        if verify:
            bundle.verify()
        return bundle

    def verify(self, names: Optional[List[str]] = None) -> None:
        """Checks size and SHA-256 of the listed files (all by default); the error names the file."""
        from samantic.models.weights import file_sha256

        files = self.manifest["files"]
        for rel in names if names is not None else list(files):
            entry = files[rel]
            path = safe_relpath(self.root, rel)
            if not path.is_file():
                raise BundleError(f"{self.root}: file {rel!r} listed in the manifest is missing")
            size = path.stat().st_size
            if size != entry.get("size"):
                raise BundleError(f"{self.root}: file {rel!r} is corrupt: {size} bytes, the manifest says {entry.get('size')}")
            digest = file_sha256(path)
            if digest != entry.get("sha256"):
                raise BundleError(f"{self.root}: file {rel!r} is corrupt: SHA-256 {digest}, the manifest says {entry.get('sha256')}")

    def referenced_files(self) -> List[str]:
        """Every file path the manifest uses (graphs, head, weights, engines)."""
        m = self.manifest
        out = [rel for per in m["graphs"].values() for rel in per.values()]
        for key in ("head", "samcp", "torch_weights"):
            if m.get(key) and m[key].get("file"):
                out.append(m[key]["file"])
        if m.get("samcp") and m["samcp"].get("queries"):
            out.append(m["samcp"]["queries"])
        for entry in m.get("engines", {}).values():
            out.extend(entry.get("files", {}).values())
        return out

    def path(self, rel: str) -> Path:
        """Absolute path of a file listed in the manifest."""
        if rel not in self.manifest["files"]:
            raise BundleError(f"{self.root}: {rel!r} is not a file of this bundle")
        return safe_relpath(self.root, rel)

    def graph(self, name: str, precision: str = "fp32") -> Path:
        """The ONNX file of a graph (``encoder``, ``prompts``, ``upscale``) at a precision."""
        graphs = self.manifest["graphs"]
        if name not in graphs:
            raise BundleError(f"{self.root}: the bundle has no {name!r} graph (it has {', '.join(graphs)})")
        per = graphs[name]
        if precision not in per:
            hint = " (export it with --int8)" if precision == "int8" else ""
            raise BundleError(f"{self.root}: graph {name!r} has no {precision} version{hint}; it has {', '.join(per)}")
        return self.path(per[precision])

    @property
    def model_id(self) -> str:
        return self.manifest["model"]["id"]

    @property
    def img_size(self) -> int:
        return int(self.manifest["input"]["img_size"])

    @property
    def pixel_mean(self) -> Tuple[float, float, float]:
        return tuple(float(v) for v in self.manifest["input"]["pixel_mean"])

    @property
    def pixel_std(self) -> Tuple[float, float, float]:
        return tuple(float(v) for v in self.manifest["input"]["pixel_std"])

    @property
    def mask_threshold(self) -> float:
        return float(self.manifest["input"]["mask_threshold"])

    @property
    def head(self) -> Optional[Dict[str, Any]]:
        """``{"classes": [...], "groups": {...}, "score_thresh": float, "file": ...}`` or None."""
        return self.manifest.get("head")

    @property
    def samcp(self) -> Optional[Dict[str, Any]]:
        """The SAM-CP section (vocabulary, input geometry, patch options, files), or None."""
        return self.manifest.get("samcp")

    @property
    def tasks(self) -> Tuple[str, ...]:
        """SUM's task names, in the order the prompts graph's ``task`` input indexes them; ``()`` for a
        bundle exported before task prompts (its prompts graph has no ``task`` input)."""
        return tuple(self.manifest.get("tasks") or ())

    @property
    def thresholds(self) -> Dict[str, Any]:
        return dict(self.manifest.get("thresholds", {}))

    @property
    def task_thresholds(self) -> Dict[str, Dict[str, float]]:
        """SUM task -> ``{"pred_iou_thresh", "stability_score_thresh"}`` calibrated for that task (those the
        exported weights file recorded, ``samantic eval thresholds --task T --record``); ``{}`` when none were.
        A task without an entry uses :attr:`thresholds`."""
        return {t: dict(v) for t, v in (self.manifest.get("task_thresholds") or {}).items()}

    def thresholds_for(self, task: Optional[str] = None) -> Dict[str, Any]:
        """:attr:`thresholds` with ``task``'s calibrated ones on top (None: "unspecified")."""
        out = self.thresholds
        out.update(self.task_thresholds.get(task or "unspecified", {}))
        return out

    @property
    def profiles(self) -> Dict[str, Dict[str, int]]:
        """Dynamic dimension name -> ``{"min", "opt", "max"}`` (TensorRT optimization profiles)."""
        return dict(self.manifest.get("profiles", {}))


def graph_input_shapes(manifest: Dict[str, Any], graph: str, level: str) -> Dict[str, Tuple[int, ...]]:
    """Input shapes of a graph at a profile level (``"min"``, ``"opt"``, ``"max"``) from the manifest.

    The TensorRT builder and onnxruntime's TensorRT EP use these as optimization profiles.
    """
    prof = manifest["profiles"]
    inp = manifest["input"]
    c, h, w = inp["embedding"]
    s, m, d = inp["img_size"], inp["multimask"], inp["token_dim"]

    def v(dim: str) -> int:
        return int(prof[dim][level])

    if graph == "encoder":
        return {"image": (1, 3, s, s)}
    if graph == "prompts":
        shapes = {"image_embeddings": (1, c, h, w), "point_coords": (v("B"), v("N"), 2),
                  "point_labels": (v("B"), v("N"))}
        if manifest.get("tasks"):
            shapes["task"] = (1,)
        return shapes
    if graph == "upscale":
        return {"src": (v("B"), c, h, w), "mask_tokens": (v("B"), m, d), "rows": (v("U"),), "token_index": (v("K"),),
                "mask_index": (v("K"),), "row_of": (v("K"),)}
    raise BundleError(f"unknown graph {graph!r}")


class BundleEngine:
    """What every engine that runs a bundle's graphs reads from its manifest (see :class:`~samantic.pipeline.engine.Engine`)."""

    tasks: Tuple[str, ...] = ()

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.img_size = bundle.img_size
        self.mask_threshold = bundle.mask_threshold
        self.pixel_mean = bundle.pixel_mean
        self.pixel_std = bundle.pixel_std
        self.multimask = int(bundle.manifest["input"]["multimask"])
        self.low_res = int(bundle.manifest["input"]["low_res"][0])

    def _set_tasks(self, prompt_inputs) -> None:
        """``tasks`` from the prompts graph's input names: the manifest's names when it takes ``task``."""
        if "task" not in prompt_inputs:
            self.tasks = ()
        elif not self.bundle.tasks:
            raise BundleError(f"{self.bundle.root}: the prompts graph takes a 'task' input but the manifest "
                              "names no tasks")
        else:
            self.tasks = self.bundle.tasks

    def task_feed(self, task: int):
        """The prompts graph's ``task`` input (int32 [1]), or None for a graph without one (task 0 only)."""
        import numpy as np

        if not self.tasks:
            if task:
                from samantic.pipeline.engine import engine_task

                engine_task(self, task)  # raises, explaining
            return None
        if not 0 <= int(task) < len(self.tasks):
            raise ValueError(f"task index must lie in [0, {len(self.tasks)}) ({', '.join(self.tasks)}), got {task}")
        return np.array([task], np.int32)

    def no_masks(self):
        """float32 ``[0, 4h, 4w]``: the upscale result when nothing survived the filters."""
        import numpy as np

        return np.zeros((0, self.low_res, self.low_res), np.float32)
