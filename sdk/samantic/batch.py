"""Batch segmentation of files: the per-image work of ``samantic segment``, locally or on Ray Data.

One image's work is the same whatever runs it: read it (a bad file becomes a
failure record, never an exception that stops the batch), segment it, write
its files (overlay, label maps, mask PNGs), then the results JSON last, since
that file marks the image as done. :func:`segment_file` does it;
``samantic segment`` calls it in a loop and :func:`segment_dataset` calls it
in Ray Data actors, so both write the same files.

Example:
    >>> from samantic.batch import SegmentOptions, segment_dataset           # doctest: +SKIP
    >>> report = segment_dataset(["photos/"], "out/", SegmentOptions(model="sam_nano"), workers=2)  # doctest: +SKIP
    >>> report.failed                                                          # doctest: +SKIP

Ray is an optional extra (``pip install 'samantic[ray]'``); nothing here
imports it until :func:`segment_dataset` runs.
"""

from __future__ import annotations

import functools
import glob
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from samantic.pipeline.config import AmgConfig

STATUSES = ("ok", "skipped", "failed")
# settings that leave an image's results as they are (where they run, how prompts are batched): a rerun may change them
_SAME_RESULTS = ("device", "points_per_batch")
INDEX_NAME = "index.parquet"


@dataclass
class Job:
    source: Path
    name: str  # output name relative to the output folder, e.g. "sub/a.jpg"


def collect_inputs(paths: Sequence[Union[str, os.PathLike]]) -> Tuple[List[Job], List[Tuple[str, str]]]:
    """Files, folders (recursive, by image extension) and globs -> jobs, plus (path, reason) of inputs that match nothing."""
    from samantic.io.images import IMAGE_EXTENSIONS

    jobs: List[Job] = []
    missing: List[Tuple[str, str]] = []
    seen = set()

    def add(path: Path, name: str) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            jobs.append(Job(path, name))

    for raw in map(str, paths):
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                missing.append((raw, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder"))
            for f in found:
                add(f, f.relative_to(p).as_posix())
        elif p.exists():
            add(p, p.name)  # given explicitly: tried whatever its extension
        elif any(ch in raw for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(raw, recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_EXTENSIONS]
            if not files:
                missing.append((raw, "the pattern matches no image files"))
            for f in files:
                add(f, f.name)
        else:
            missing.append((raw, "no such file or folder"))
    names: dict = {}
    for j in jobs:  # two inputs with one output name: keep both apart
        if j.name in names:
            names[j.name] += 1
            stem = Path(j.name)
            j.name = str(stem.with_name(f"{stem.stem}-{names[j.name]}{stem.suffix}"))
        else:
            names[j.name] = 0
    return jobs, missing


# the generator's own defaults (samantic.pipeline.config is light: no torch, no OpenCV)
_AMG = {f.name: f.default for f in fields(AmgConfig)}


@dataclass
class SegmentOptions:
    """What ``samantic segment`` builds its :class:`~samantic.runtime.Segmenter` from (picklable, so a
    Ray actor builds the same one). The fields are the CLI's options of the same names."""

    model: Optional[str] = None  # None: sam_nano, or the SAM a SAM-CP head was trained on
    checkpoint: Optional[str] = None
    bundle: Optional[str] = None
    backend: str = "auto"
    precision: str = "fp32"
    points_per_side: Optional[int] = None  # None: 32, or the grid a SAM-CP head was trained with
    points_per_batch: int = _AMG["points_per_batch"]
    pred_iou_thresh: Optional[float] = None  # None: the model's, the bundle's or segment-anything's
    stability_score_thresh: Optional[float] = None
    stability_score_offset: float = _AMG["stability_score_offset"]
    box_nms_thresh: Optional[float] = None  # None: the model's, the bundle's or segment-anything's 0.7
    crop_n_layers: int = _AMG["crop_n_layers"]
    crop_nms_thresh: float = _AMG["crop_nms_thresh"]
    crop_overlap_ratio: float = _AMG["crop_overlap_ratio"]
    crop_n_points_downscale_factor: int = _AMG["crop_n_points_downscale_factor"]
    min_mask_region_area: int = _AMG["min_mask_region_area"]
    task: str = "unspecified"
    classes: Optional[str] = None
    head: Optional[str] = None
    score_thresh: Optional[float] = None
    samcp: Optional[str] = None
    adaptive: bool = False
    adaptive_margin: Optional[float] = None
    mask_pngs: bool = False
    device: str = "cpu"
    threads: Optional[int] = None  # torch / onnxruntime threads (None: their defaults)

    def replace(self, **changes: Any) -> "SegmentOptions":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown segment option(s) {unknown}; known: {sorted(known)}")
        return SegmentOptions(**{**asdict(self), **changes})


@dataclass
class Prepared:
    """A built :class:`~samantic.runtime.Segmenter` and what the result files record about the run."""

    segmenter: Any
    options: SegmentOptions
    config: Any
    model: str
    weights: str  # words for the console: "shipped weights", a file, a bundle
    head_name: Optional[str]
    run_extra: Dict[str, Any]
    names: tuple = ()  # the class names masks are labelled with (empty without a head)
    panoptic: bool = False  # a SAM-CP head: panoptic outputs
    notes: List[str] = field(default_factory=list)  # warnings for the user (stderr)

    @property
    def settings(self) -> Dict[str, Any]:
        return {k: v for k, v in vars(self.config).items() if k != "point_grids"}

    @functools.cached_property
    def classes(self) -> tuple:
        """The class names this run labels: a SAM-CP head's ``--classes`` subset of its vocabulary, else ``names``."""
        samcp = getattr(self.segmenter, "samcp", None)
        wanted = getattr(samcp, "wanted", None)
        if samcp is not None and wanted is not None:
            return tuple(n for n, w in zip(samcp.names, wanted) if w)
        return tuple(self.names)

    @functools.cached_property
    def run_record(self) -> Dict[str, Any]:
        """What made an image's results (in every results JSON as ``run``): a rerun into the same folder with
        other weights, head, classes or settings does not take them for its own."""
        import json

        o = self.options
        record = {"model": self.model, "checkpoint": o.checkpoint, "bundle": None if o.bundle is None else str(o.bundle),
                  "head": self.head_name, "classes": list(self.classes),
                  "settings": {k: v for k, v in self.settings.items() if k not in _SAME_RESULTS}}
        return json.loads(json.dumps(record, default=str))  # as it reads back from the file

    def expected_outputs(self, out: Path, name: str) -> List[Path]:
        """The files :func:`write_outputs` writes for the image ``name`` (its results JSON last, not listed)."""
        out = Path(out)
        files = [out / f"{name}.overlay.png"]
        if self.panoptic:
            files += [out / f"{name}.semantic.png", out / f"{name}.panoptic.png", out / f"{name}.panoptic.json"]
        elif self.names:
            files.append(out / f"{name}.semantic.png")
        if self.options.mask_pngs:
            files.append(out / f"{name}.masks" / "metadata.csv")
        return files


def _class_list(classes: Optional[str]) -> Optional[List[str]]:
    return None if classes is None else [n.strip() for n in classes.split(",") if n.strip()]


def prepare(options: SegmentOptions) -> Prepared:
    """Builds the Segmenter ``samantic segment`` would build from these options.

    Raises:
        ValueError: contradictory options, unknown class names, an unreadable or corrupt
            weights, head or bundle file (the message names the file).
        FileNotFoundError: a missing file.
        ImportError: a backend's package is missing (the message names the extra).
    """
    from samantic.models.loading import OPTIONAL_THRESHOLD_NAMES, THRESHOLD_NAMES
    from samantic.models.registry import DEFAULT_MODEL, SAM_THRESHOLDS, default_thresholds, get_config, get_model_entry
    from samantic.runtime import Segmenter

    o = options
    notes: List[str] = []
    if o.adaptive_margin is not None and not o.adaptive:
        raise ValueError("--adaptive-margin only means something with --adaptive")
    if o.classes is not None and o.head is None and o.bundle is None and o.samcp is None:
        raise ValueError("--classes needs --head (a U-SAM head from `samantic train usam`), --samcp (a SAM-CP head "
                         "from `samantic train samcp`) or a --bundle with a head")
    if o.samcp is not None and (o.head is not None or o.bundle is not None):
        raise ValueError("--samcp runs on --model (torch); leave out --head and --bundle (a bundle exported with "
                         "--samcp brings its SAM-CP head)")
    if o.threads is not None:
        _set_threads(o.threads, torch=o.bundle is None or o.backend == "torch")
    model = o.model
    samcp_head = None
    if o.samcp is not None:
        from samantic.heads.samcp import load_samcp
        from samantic.pipeline.panoptic import patch_options

        samcp_head = load_samcp(o.samcp)
        model = samcp_head.sam_for(model, o.samcp)
        if o.classes is not None:
            samcp_head.check_classes(_class_list(o.classes))
    if model is None:
        model = DEFAULT_MODEL
    if o.classes is not None:
        from samantic.pipeline.scoring import check_class_names

        check_class_names(o.classes, what="--classes list")
    thresholds = dict(SAM_THRESHOLDS, box_nms_thresh=_AMG["box_nms_thresh"])
    calibrated = THRESHOLD_NAMES + OPTIONAL_THRESHOLD_NAMES
    if o.bundle is None:
        # calibrated defaults: those the weights file records (for --task, else its "unspecified" ones), the
        # shipped weights' (registry), else segment-anything's
        found, source = default_thresholds(model, o.checkpoint, o.task)
        thresholds.update(found)
        flags = o.pred_iou_thresh is not None and o.stability_score_thresh is not None
        ours = o.checkpoint is not None and o.checkpoint.lower().endswith(".safetensors")  # not an official .pth
        if ours and not flags and o.samcp is None:
            if source == "segment-anything":
                notes.append(f"note: {o.checkpoint} records no calibrated thresholds: segment-anything's "
                             f"{found['pred_iou_thresh']} / {found['stability_score_thresh']} used (`samantic eval "
                             f"thresholds --checkpoint {o.checkpoint} --record` calibrates and records them)")
            elif source == "recorded" and o.task != "unspecified":
                notes.append(f"note: {o.checkpoint} records thresholds for --task unspecified, none for --task "
                             f"{o.task}: those used ({found['pred_iou_thresh']} / {found['stability_score_thresh']})")
    bundle_info = None
    if o.bundle is not None:
        from samantic.runtime import Bundle

        if o.head is not None or o.checkpoint is not None:
            raise ValueError("--bundle brings its own weights and head; leave out --head/--checkpoint")
        bundle_info = Bundle.load(o.bundle, verify=False)  # verified once, by from_bundle
        thresholds.update({k: v for k, v in bundle_info.thresholds_for(o.task).items() if k in calibrated})
        if o.classes is not None and bundle_info.samcp:
            from samantic.pipeline.panoptic import check_names

            sc = bundle_info.samcp
            check_names(list(sc["classes"]) + list(sc["stuff"]), _class_list(o.classes), f"the SAM-CP head of {o.bundle}")
    trained: Dict[str, Any] = {}
    if samcp_head is not None:  # the patches the head was trained on: its grid and thresholds
        trained = patch_options(samcp_head.info)
    elif bundle_info is not None and bundle_info.samcp:
        trained = dict(bundle_info.samcp.get("patches") or {})
    if trained:  # the SAM-CP head's patches: its thresholds, and segment-anything's box NMS unless it records one
        thresholds.update({"box_nms_thresh": _AMG["box_nms_thresh"],
                           **{k: v for k, v in trained.items() if k in calibrated}})
    points_per_side = o.points_per_side if o.points_per_side is not None else int(trained.get("points_per_side", 32))
    if o.pred_iou_thresh is not None:
        thresholds["pred_iou_thresh"] = o.pred_iou_thresh
    if o.stability_score_thresh is not None:
        thresholds["stability_score_thresh"] = o.stability_score_thresh
    if o.box_nms_thresh is not None:
        thresholds["box_nms_thresh"] = o.box_nms_thresh
    config = AmgConfig(
        points_per_side=points_per_side, points_per_batch=o.points_per_batch, **thresholds,
        stability_score_offset=o.stability_score_offset,
        crop_n_layers=o.crop_n_layers, crop_nms_thresh=o.crop_nms_thresh, crop_overlap_ratio=o.crop_overlap_ratio,
        crop_n_points_downscale_factor=o.crop_n_points_downscale_factor,
        min_mask_region_area=o.min_mask_region_area, output_mode="coco_rle", adaptive=o.adaptive,
        **({"adaptive_margin": o.adaptive_margin} if o.adaptive_margin is not None else {}), device=o.device,
        task=o.task,
    )
    if bundle_info is not None:
        wanted: Any = o.classes
        if bundle_info.samcp and o.classes is not None:
            wanted = _class_list(o.classes)
        segmenter = Segmenter.from_bundle(bundle_info, backend=o.backend, precision=o.precision, classes=wanted,
                                          score_thresh=o.score_thresh, config=config, threads=o.threads)
        model = bundle_info.model_id
        weights = f"bundle {o.bundle}, {segmenter.engine.name} {o.precision}"
    else:
        from samantic.models import create_model

        head_module = None
        if o.head is not None:
            from samantic.heads.usam import load_head

            head_module = load_head(o.head)
        sam = create_model(model, checkpoint=o.checkpoint)
        side, config_side = int(sam.image_encoder.img_size), get_config(model).img_size
        if side != config_side:  # a conv model's weights fine-tuned at another side (create_model reads their header)
            notes.append(f"note: {o.checkpoint} was trained at input side {side} px; {model} runs there "
                         f"(its config's side: {config_side} px)")
        if o.device.startswith("cuda"):  # the model too, not only the post-processing kernels
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {o.device}: torch sees no CUDA device here (use --device cpu)")
            sam = sam.to(o.device)
        table = getattr(sam, "task_prompt", None)
        if o.task != "unspecified" and (table is None or not table.embed.weight.any()):
            notes.append(f"note: {model} ({o.checkpoint or 'shipped weights'}) has no trained task embeddings: "
                         f"--task {o.task} gives the masks of --task unspecified")
        if head_module is not None:
            head_module.check_model(sam, model, o.head)
        if samcp_head is not None:
            import warnings

            from samantic.pipeline.panoptic import SamcpWeightsWarning

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", SamcpWeightsWarning)
                segmenter = Segmenter(sam, samcp=samcp_head, classes=_class_list(o.classes), config=config,
                                      samcp_options={} if o.score_thresh is None else {"score_thresh": o.score_thresh})
            for w in caught:  # ours go to the console with the other notes; anything else is raised again
                if issubclass(w.category, SamcpWeightsWarning):
                    notes.append(f"warning: {w.message}")
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        else:
            segmenter = Segmenter(sam, head_module, classes=o.classes, score_thresh=o.score_thresh, config=config)
        if o.checkpoint:
            weights = o.checkpoint
        elif get_model_entry(model).default_weights:
            weights = "shipped weights"
        else:
            weights = "RANDOM weights: no trained weights are shipped for this model, pass --checkpoint"
            notes.append(f"warning: {model} has no trained weights; its masks will be meaningless (pass --checkpoint)")
    names = segmenter.names
    head_name = o.samcp if o.samcp is not None else (o.head if o.head is not None else (o.bundle if names else None))
    run_extra = {"bundle": str(o.bundle), "backend": segmenter.engine.name} if o.bundle is not None else {}
    return Prepared(segmenter, o, config, model, weights, None if head_name is None else str(head_name), run_extra,
                    names=tuple(names), panoptic=segmenter.samcp is not None, notes=notes)


def default_threads() -> int:
    """The intra-op threads a local run would use: ``OMP_NUM_THREADS`` when it is set to a positive
    integer (torch follows it), else this machine's cores. A Ray run divides these
    among its workers, so that it computes what a local run computes in the same environment."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return os.cpu_count() or 1


def _set_threads(n: int, torch: bool) -> None:
    """torch's (when it runs the model) and an already imported OpenCV's intra-op threads; onnxruntime
    takes ``threads`` when its sessions are created."""
    import sys

    if torch:
        import torch as _torch

        _torch.set_num_threads(max(1, int(n)))
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(max(1, int(n)))


def write_outputs(prepared: Prepared, out: Path, job: Job, image: Any, result: Any) -> int:
    """Writes one image's files; the results JSON last (it marks the image as done). Returns the mask count."""
    from samantic.io import atomic_write_image, overlay_masks
    from samantic.io.writers import coco_results, write_label_png, write_mask_pngs, write_results_json
    from samantic.ops import rle_decode

    o = prepared.options
    h, w = image.shape[:2]
    records = result.instances
    if prepared.panoptic:
        if o.mask_pngs:
            from samantic.io.panoptic import write_segment_pngs

            write_segment_pngs(out / f"{job.name}.masks", result.panoptic_map, result.segments_info)
        write_samcp_outputs(out, job, image, result, prepared.model, o.checkpoint, prepared.head_name,
                            prepared.config, extra={**prepared.run_extra, "run": prepared.run_record})
        return len(records)
    names = prepared.names
    masks = rle_decode(result.masks.rles) if records else None  # the batch, not the records' strings
    labels = [r["category"] for r in records] if names else None
    atomic_write_image(out / f"{job.name}.overlay.png",
                       overlay_masks(image, masks, labels) if masks is not None else image)
    if names:
        write_label_png(out / f"{job.name}.semantic.png", result.semantic_map)
    if o.mask_pngs and masks is not None:
        write_mask_pngs(out / f"{job.name}.masks", masks, records)
    extra = dict(prepared.run_extra)
    if names:
        extra.update(head=str(prepared.head_name), categories=[{"id": i + 1, "name": n} for i, n in enumerate(names)])
        for r in records:
            r["score"] = r["class_score"]
    write_results_json(out / f"{job.name}.json", {"file_name": str(job.source), "height": h, "width": w},
                       coco_results(records), model=prepared.model, checkpoint=o.checkpoint,
                       settings=prepared.settings, run=prepared.run_record, **extra)
    return len(records)


def write_samcp_outputs(out: Path, job: Job, image: Any, result: Any, model: str, checkpoint: Optional[str],
                        samcp: Any, config: Any, extra: Optional[dict] = None) -> None:
    """A SAM-CP result's files; the results JSON is written last (it marks the image as done)."""
    from samantic.io import atomic_write_image
    from samantic.io.panoptic import write_panoptic, write_semantic_png
    from samantic.io.writers import write_results_json

    h, w = image.shape[:2]
    things = result.output.things
    categories = [{"id": i + 1, "name": n, "isthing": int(i < things), "supercategory": "thing" if i < things else "stuff"}
                  for i, n in enumerate(result.names)]
    atomic_write_image(out / f"{job.name}.overlay.png", result.overlay())
    write_semantic_png(out / f"{job.name}.semantic.png", result.semantic_map)
    png = out / f"{job.name}.panoptic.png"
    write_panoptic(png, out / f"{job.name}.panoptic.json", result.panoptic_map, result.segments_info,
                   {"id": 1, "file_name": Path(job.name).name, "source": str(job.source), "height": h, "width": w},
                   categories)
    write_results_json(out / f"{job.name}.json", {"file_name": str(job.source), "height": h, "width": w},
                       result.to_coco(), model=model, checkpoint=checkpoint, samcp=str(samcp), categories=categories,
                       settings={k: v for k, v in vars(config).items() if k != "point_grids"}, **(extra or {}))


def result_path(out: Path, name: str) -> Path:
    """The file whose presence marks an image as done."""
    return Path(out) / f"{name}.json"


def _row(job: Job, status: str = "ok", **values: Any) -> Dict[str, Any]:
    """An index row (see :func:`segment_file`)."""
    return {"image": str(job.source), "name": job.name, "status": status, "masks": 0, "seconds": 0.0, "error": "",
            **values}


def segment_file(prepared: Prepared, out: Path, job: Job, *, overwrite: bool = False, image: Any = None,
                 warnings: Optional[List[str]] = None, since: Optional[float] = None) -> Dict[str, Any]:
    """Segments one image file and writes its results; never raises for a bad image.

    Args:
        prepared: from :func:`prepare`.
        out: the output folder.
        job: the source file and its output name.
        overwrite: redo an image whose results JSON exists (else it is skipped).
        image: the decoded uint8 RGB image, when already read (e.g. by ``ray.data.read_images``).
        warnings: conversions that happened while reading (16-bit, alpha, ...) are appended.
        since: the run's start (``time.time()``): results written after it come from an earlier attempt
            of this run (a retried task): they count as "ok", not "skipped", and are not redone, even
            with ``overwrite``.

    Returns:
        The image's index row: ``image`` (source path), ``name``, ``status`` (ok / skipped /
        failed), ``masks``, ``seconds`` (segmenting only), ``error`` (the reason, for a failure).
    """
    from samantic.io import ImageReadError, read_image

    row = _row(job)
    done = result_path(out, job.name)
    if done.exists():
        earlier_attempt = since is not None and done.stat().st_mtime >= since  # a retried task: not redone
        if earlier_attempt:
            row.update(status="ok", masks=_count_masks(done))
            return row
        if not overwrite:
            other = _other_run(done, prepared.run_record)
            if other:
                row.update(status="failed", error=f"{done} holds the results of another run ({other}); pass "
                           "--overwrite to replace them, or write to another --out")
                return row
            if other is not None and all(p.exists() for p in prepared.expected_outputs(out, job.name)):
                row.update(status="skipped", masks=_count_masks(done))
                return row
            # an unreadable results JSON, or some of this run's files missing (removed, or asked for now,
            # e.g. --mask-pngs): the image is done again
    if image is None:
        notes: List[str] = []
        try:
            image = read_image(job.source, notes=notes)
        except ImageReadError as e:
            row.update(status="failed", error=str(e).split(": ", 1)[-1])
            return row
        if warnings is not None:
            warnings.extend(notes)
    t0 = time.perf_counter()
    try:
        result = prepared.segmenter(image)
    except ValueError as e:  # an image the pipeline refuses (shape, dtype)
        row.update(status="failed", error=f"cannot segment: {e}")
        return row
    except Exception as e:  # noqa: BLE001 -- one image's failure must not end the batch; it is reported
        row.update(status="failed", error=f"cannot segment: {type(e).__name__}: {e}")
        return row
    row["seconds"] = time.perf_counter() - t0
    try:
        row["masks"] = write_outputs(prepared, Path(out), job, image, result)
    except Exception as e:  # noqa: BLE001 -- a full disk, a permission: every write is atomic, nothing half-written
        row.update(status="failed", error=f"cannot write its results: {type(e).__name__}: {e}")
    return row


def _other_run(path: Path, record: Dict[str, Any]) -> Optional[str]:
    """How the run that wrote the results JSON ``path`` differs from ``record``: '' when it does not (or when the
    file predates the record and cannot tell), None when the file cannot be read as a results JSON."""
    import json

    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    theirs = data.get("run")
    if not isinstance(theirs, dict):
        return ""
    from samantic.io.writers import record_diffs

    return "; ".join(record_diffs(theirs, record, sep=" ")[:6])


def _count_masks(path: Path) -> int:
    """Annotations in an existing results JSON (-1 if it cannot be read)."""
    import json

    try:
        return len(json.loads(Path(path).read_bytes()).get("annotations", []))
    except (OSError, ValueError, AttributeError):
        return -1


# ---------------------------------------------------------------------------------------------- index file


def write_index(path: Union[str, os.PathLike], rows: Sequence[Dict[str, Any]]) -> Path:
    """The run's index as Parquet (``image``, ``name``, ``status``, ``masks``, ``seconds``, ``error``), atomically."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from samantic.io import atomic_write_bytes

    schema = pa.schema([("image", pa.string()), ("name", pa.string()), ("status", pa.string()),
                        ("masks", pa.int64()), ("seconds", pa.float64()), ("error", pa.string())])
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return atomic_write_bytes(path, buf.getvalue())


def read_index(path: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """The rows of an index written by :func:`write_index`."""
    import pyarrow.parquet as pq

    return pq.read_table(str(path)).to_pylist()


# ---------------------------------------------------------------------------------------------- Ray Data


def import_ray():
    """``ray`` and ``ray.data``, or an ImportError that says what to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(f"--engine ray needs Ray Data ({e}): pip install 'samantic[ray]' "
                          "(or pip install 'ray[data]')") from None
    return ray


class SegmentActor:
    """A Ray Data actor: builds one Segmenter when it starts and segments the batches it is given.

    A batch holds ``path`` and ``name`` columns (and ``image`` when the dataset decoded the images
    already); the actor returns the index rows of :func:`segment_file`.
    """

    def __init__(self, options: SegmentOptions, out: str, overwrite: bool = False,
                 since: Optional[float] = None) -> None:
        self.prepared = prepare(options)
        self.out = Path(out)
        self.overwrite = overwrite
        self.since = since  # the run's start: a retried image already written in this run is not redone
        pid_dir = os.environ.get("SAMANTIC_ACTOR_PID_DIR")  # tests: which processes to kill
        if pid_dir:
            Path(pid_dir).mkdir(parents=True, exist_ok=True)
            (Path(pid_dir) / str(os.getpid())).touch()

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        import numpy as np

        rows = []
        paths = batch["path"]
        names = batch.get("name")
        images = batch.get("image")
        for i, path in enumerate(paths):
            name = str(names[i]) if names is not None else Path(str(path)).name
            job = Job(Path(str(path)), name)
            image = None
            if images is not None:
                image = np.ascontiguousarray(np.asarray(images[i], dtype=np.uint8))
                if image.ndim == 2:
                    image = np.repeat(image[..., None], 3, axis=2)
            try:
                row = segment_file(self.prepared, self.out, job, overwrite=self.overwrite, image=image,
                                   since=self.since)
            except Exception as e:  # noqa: BLE001 - one image's failure is recorded, the job goes on
                row = _row(job, "failed", error=f"{type(e).__name__}: {e}")
            rows.append(row)
        return {k: np.array([r[k] for r in rows], dtype=object if k in ("image", "name", "status", "error") else None)
                for k in ("image", "name", "status", "masks", "seconds", "error")}


@dataclass
class BatchReport:
    """What :func:`segment_dataset` did: one index row per image (see :func:`segment_file`)."""

    rows: List[Dict[str, Any]]
    missing: List[Tuple[str, str]]  # inputs that matched nothing: (path, reason)
    index: Optional[Path]
    seconds: float  # wall-clock of the run (Ray start included when it started Ray)
    interrupted: bool = False

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def failed(self) -> List[Tuple[str, str]]:
        return [(r["image"], r["error"]) for r in self.rows if r["status"] == "failed"] + list(self.missing)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted


def _ray_init(ray: Any, address: Optional[str], workers: int, cpus_per_worker: float, gpus_per_worker: float) -> bool:
    """Connects to ``address`` or starts a local Ray sized for the actors; True if this call started it."""
    if ray.is_initialized():
        return False
    import logging

    kw: Dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if address:
        ray.init(address=address, **kw)
        return True
    env_address = os.environ.get("RAY_ADDRESS")
    if env_address:
        ray.init(address=env_address, **kw)
        return True
    cpus = max(os.cpu_count() or 1, int(-(-workers * cpus_per_worker // 1)) + 1)  # the actors and a reader
    ray.init(num_cpus=cpus, _node_ip_address="127.0.0.1", object_store_memory=int(os.environ.get(
        "SAMANTIC_RAY_OBJECT_STORE", 512 * 2**20)), **kw)
    return True


def _check_resources(ray: Any, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """An actor the cluster can never place would wait for ever: say so instead."""
    have = ray.cluster_resources()
    for what, need in (("GPU", gpus_per_worker), ("CPU", cpus_per_worker)):
        if need > have.get(what, 0.0):
            raise ValueError(f"each worker asks for {need:g} {what}(s) but the Ray cluster has "
                             f"{have.get(what, 0.0):g}" + (" (no GPU is visible to Ray here)" if what == "GPU" else ""))


def _check(options: SegmentOptions) -> Prepared:
    """:func:`prepare` on the driver (its Segmenter dropped: the actors build their own)."""
    prepared = prepare(options)
    prepared.segmenter = None
    return prepared


def _keep_sigterm_handler(fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` (``ray.init``, which installs its own SIGTERM handler in the driver) and puts back a
    Python SIGTERM handler the caller had set (``samantic segment`` turns SIGTERM into a clean stop)."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        return fn()
    finally:
        if main and callable(before):
            signal.signal(signal.SIGTERM, before)


def segment_dataset(inputs: Any, out: Union[str, os.PathLike], options: Optional[SegmentOptions] = None, *,
                    workers: int = 1, gpus_per_worker: float = 0.0, cpus_per_worker: Optional[float] = None,
                    address: Optional[str] = None, overwrite: bool = False, batch_size: int = 1,
                    index: Optional[Union[str, os.PathLike]] = INDEX_NAME,
                    on_row: Optional[Callable[[Dict[str, Any]], None]] = None, shutdown: bool = True,
                    check: bool = True, on_checked: Optional[Callable[[Prepared], None]] = None) -> BatchReport:
    """Segments files (or a Ray dataset of images) on Ray Data with an actor pool.

    Each actor builds one Segmenter (the model or bundle is loaded once per actor) and writes the
    same files as ``samantic segment`` run locally. Images whose results exist are skipped (unless
    ``overwrite``); a bad file is recorded with its reason and the run goes on; an actor that dies
    is restarted by Ray and its in-flight images retried.

    Args:
        inputs: paths (files, folders, globs, as for ``samantic segment``) or :class:`Job` s from
            :func:`collect_inputs`, or a ``ray.data.Dataset``
            with a ``path`` column (and optionally ``image``, e.g. ``ray.data.read_images(...,
            include_paths=True)``; the output name is the path's file name).
        out: the output folder.
        options: the Segmenter's options (default: ``sam_nano`` at its defaults).
        workers: actors in the pool.
        gpus_per_worker: GPUs each actor asks Ray for (fractions share a GPU). With GPUs the
            post-processing runs on ``cuda`` unless ``options.device`` says otherwise.
        cpus_per_worker: CPUs each actor reserves in Ray's scheduler (default 1, leaving room for
            the tasks that read a dataset). Its torch / onnxruntime threads are ``options.threads``
            (default: :func:`default_threads` divided among the workers, at least 1).
        address: a running cluster (``"auto"`` or ``"ray://HOST:PORT"``); default: the ``RAY_ADDRESS``
            environment variable, else a local Ray started for this run (loopback only) and stopped after.
        overwrite: redo images whose results exist.
        batch_size: images per actor call.
        index: file name (relative to ``out``) or path of the Parquet index; None: none written.
        on_row: called on the driver with each image's row, skipped ones included (progress bars).
        shutdown: stop a Ray this call started when done.
        check: build the Segmenter once on the driver first (on the CPU, while Ray starts), so that
            a bad option or a corrupt weights, head or bundle file is one error raised here rather
            than one per actor.
        on_checked: called on the driver with that check's :class:`Prepared` (its ``segmenter``
            already dropped) before any image is sent (the CLI prints its banner and notes).

    Returns:
        A :class:`BatchReport`; its index file lists every image (ok, skipped or failed) with masks,
        seconds and the error. Interrupted (Ctrl-C or SIGTERM on the driver), the rows finished so far
        are written to the index and the interrupt is raised again.

    Raises:
        ImportError: Ray is not installed (the message says what to install).
        ValueError: bad options, or no images.
    """
    options = options or SegmentOptions()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if gpus_per_worker < 0:
        raise ValueError(f"gpus_per_worker must be >= 0, got {gpus_per_worker}")
    if gpus_per_worker > 0 and options.device == "cpu":
        options = options.replace(device="cuda")
    if cpus_per_worker is None:
        cpus_per_worker = 1.0
    if options.threads is None:
        options = options.replace(threads=max(1, default_threads() // workers))
    ray = import_ray()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    missing: List[Tuple[str, str]] = []
    t0 = time.perf_counter()
    since = time.time() - 1.0  # file systems with coarse timestamps: a result older than this is from before
    is_dataset = hasattr(inputs, "map_batches")
    if not is_dataset:
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        if inputs and all(isinstance(i, Job) for i in inputs):  # already collected (the CLI's)
            jobs, missing = list(inputs), []
        else:
            jobs, missing = collect_inputs(list(inputs))
        todo = []
        for job in jobs:  # resumable: what is done is skipped here, not shipped to an actor
            done = result_path(out, job.name)
            if done.exists() and not overwrite:
                rows.append(_row(job, "skipped", masks=_count_masks(done)))
                if on_row is not None:
                    on_row(rows[-1])
            else:
                todo.append(job)
        if not jobs:
            raise ValueError("no images to segment: " + "; ".join(f"{p}: {r}" for p, r in missing))
    checking = None  # in a thread: it overlaps Ray's start-up (idle waits, mostly)
    if check:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="samantic-check")
        # the driver of a cluster may have no GPU: the check builds on the CPU when the actors ask for GPUs
        checking = pool.submit(_check, options.replace(threads=None,
                                                       device="cpu" if gpus_per_worker > 0 else options.device))
        pool.shutdown(wait=False)  # the one task runs on; result() below waits for it
    started = _keep_sigterm_handler(lambda: _ray_init(ray, address, workers, cpus_per_worker, gpus_per_worker))
    interrupted = False
    try:
        if checking is not None:
            prepared = checking.result()  # the check's error (ValueError, FileNotFoundError, ImportError) is raised
            if on_checked is not None:
                on_checked(prepared)
        _check_resources(ray, cpus_per_worker, gpus_per_worker)
        if is_dataset:
            ds = inputs
        elif todo:
            # a block per image (up to 10,000 blocks): a killed actor loses only the image it was segmenting
            ds = ray.data.from_items([{"path": str(j.source), "name": j.name} for j in todo],
                                     override_num_blocks=max(1, min(len(todo), 10_000)))
        else:
            ds = None
        if ds is not None:
            ds = ds.map_batches(SegmentActor, fn_constructor_kwargs={"options": options, "out": str(out),
                                                                     "overwrite": overwrite, "since": since},
                                batch_size=batch_size, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=workers),
                                num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None)
            for row in ds.iter_rows():
                row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        report = BatchReport(rows, missing, None, time.perf_counter() - t0, interrupted)
        if index is not None:
            report.index = write_index(out / index, rows)
        if started and shutdown:
            ray.shutdown()
    return report
