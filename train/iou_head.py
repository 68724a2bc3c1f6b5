"""Refitting a SAM's IoU head to segment-everything's question: how good is this mask, wherever the point fell?

SAM's interactive recipe trains the IoU head only on points inside objects, yet segment-everything asks it about
every point of a grid, most of which fall on the background or between things, and keeps the masks it scores
above ``pred_iou_thresh``. sam_nano v7's head tracks the true IoU of those candidates with correlation 0.64, so the
thresholds that keep about one mask per object drop a quarter of the objects (``samantic eval thresholds``).

:func:`refit_iou_head` refits the head alone (``mask_decoder.iou_prediction_head``: every other weight, so every
mask, stays as it is; only the scores change) on training scenes. Per scene: points drawn uniformly over the image
(segment-everything's candidates) and one at each object's centre (the 1-point measure's prompt); per point the
decoder's four masks; the target of each is its mask's IoU with the object under the point (what a click there asks
for), or for a point on no object with the best-matching object, 0 for a mask of nothing (what ``samantic eval
thresholds`` calls the true IoU). Targeting the best-matching object everywhere (the first try) taught the head to
favour, clicked on a small thing, the larger thing beside it: 1-point mIoU fell from 0.838 to 0.816. The head's inputs are collected once (no gradient flows
into the transformer), and the head trains on them in seconds with SAM's IoU loss (mean squared error).

The scores' scale changes, so a refitted file carries no calibrated thresholds: calibrate it with ``samantic eval
thresholds --checkpoint FILE --record``. Measured on sam_nano v7: ``benchmarks/results/iou_head_refit/``
(segment-everything recall +0.044 at the same masks per image, 3-point mIoU -0.007: not shipped).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from samantic.train.metrics import TRAIN_SEED_START, _CALIBRATION_OBJECTS, _progress, centre_point

__all__ = ["IouExamples", "collect_iou_examples", "iou_head_quality", "fit_iou_head", "write_refitted",
           "refit_iou_head", "IouHeadResult", "HEAD_PREFIX", "SCENE_KINDS"]

HEAD_PREFIX = "mask_decoder.iou_prediction_head."
SCENE_KINDS = ("v1", "v2")  # v1: shape instances; v2: panoptic entities (things whole, stuff regions)
_KEYS = ("feats", "preds", "trues", "kinds")


@dataclass
class IouExamples:
    """Per prompt: ``feats`` the IoU head's input (the IoU token after the decoder's transformer), ``preds`` the
    head's current four predictions, ``trues`` the true IoU of each of the four masks, ``kinds`` 0 for a uniformly
    drawn point, 1 for an object's centre."""

    feats: np.ndarray
    preds: np.ndarray
    trues: np.ndarray
    kinds: np.ndarray

    def __len__(self) -> int:
        return len(self.feats)

    def save(self, path: Union[str, Path]) -> Path:
        """Writes the examples as ``.npz``, atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **{k: getattr(self, k) for k in _KEYS})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "IouExamples":
        with np.load(path) as f:
            missing = [k for k in _KEYS if k not in f]
            if missing:
                raise ValueError(f"{path}: not a file of IoU-head examples (no {', '.join(missing)})")
            return cls(**{k: f[k] for k in _KEYS})


def _objects(kind: str) -> Callable[[int], Tuple[np.ndarray, np.ndarray]]:
    if kind not in SCENE_KINDS:
        raise ValueError(f"scenes must be one of {', '.join(SCENE_KINDS)}, got {kind!r}")
    return _CALIBRATION_OBJECTS[kind]


def _check_model(model) -> None:
    if getattr(model, "task_prompt", None) is not None:
        raise ValueError("this model has SUM's task table: the refit prompts without tasks and would score the "
                         "'unspecified' answer only; refit the base model's head instead")


def collect_iou_examples(model, seeds: Iterable[int], *, scenes: str = "v1", uniform_points: int = 48,
                         chunk: int = 32, seed: int = 0, progress: bool = True) -> IouExamples:
    """Prompts ``model`` on the scenes of ``seeds`` and records what its IoU head sees and should say.

    Per scene: ``uniform_points`` points drawn uniformly over the image and one at each object's centre
    (:func:`~samantic.train.metrics.centre_point`), each decoded into segment-anything's four masks
    (``MaskDecoder.predict_masks``), post-processed as segment-anything does (``Sam.postprocess_masks``, threshold
    ``mask_threshold``) and scored by its IoU with the object under the point (what a click there asks for, what
    the 1-point measure scores), or, for a point on no object, with the best-matching object of the scene (a
    candidate segment-everything may keep).

    Args:
        scenes: ``"v1"`` (plain scenes, objects: shape instances) or ``"v2"`` (panoptic scenes, objects: entities).
        seed: seeds the point draws (the scenes come from ``seeds``).
    """
    from segment_anything import SamPredictor

    from samantic.ops import rle_encode, rle_iou

    _check_model(model)
    image_and_objects = _objects(scenes)
    seeds = list(seeds)
    model.eval()
    predictor = SamPredictor(model)
    head = model.mask_decoder.iou_prediction_head
    captured: List[torch.Tensor] = []
    hook = head.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach()))
    rng = np.random.default_rng(seed)
    out: Dict[str, List[np.ndarray]] = {k: [] for k in _KEYS}
    pe = model.prompt_encoder.get_dense_pe()
    try:
        with _progress(progress, len(seeds)) as advance, torch.no_grad():
            for s in seeds:
                image, objects = image_and_objects(s)
                h, w = image.shape[:2]
                predictor.set_image(image)
                objects = np.asarray(objects, bool).reshape(-1, h, w)
                pts = np.concatenate([
                    np.stack([rng.uniform(0, w, uniform_points), rng.uniform(0, h, uniform_points)], 1),
                    np.array([centre_point(m) for m in objects], np.float64).reshape(-1, 2)]).astype(np.float32)
                out["kinds"].append(np.r_[np.zeros(uniform_points, np.int8), np.ones(len(objects), np.int8)])
                gt_rles = rle_encode(objects) if len(objects) else None
                # the object under each point (-1: none); visible masks do not overlap, the first one wins if they do
                px = np.clip(pts.astype(np.int64), 0, [w - 1, h - 1])
                hit = objects[:, px[:, 1], px[:, 0]] if len(objects) else np.zeros((0, len(pts)), bool)
                under = np.where(hit.any(0), hit.argmax(0), -1) if len(objects) else np.full(len(pts), -1)
                coords = predictor.transform.apply_coords(pts, predictor.original_size)
                for i in range(0, len(pts), chunk):
                    c = torch.as_tensor(coords[i:i + chunk])[:, None, :]
                    sparse, dense = model.prompt_encoder(points=(c, torch.ones(len(c), 1, dtype=torch.int)),
                                                         boxes=None, masks=None)
                    captured.clear()
                    low, iou_pred = model.mask_decoder.predict_masks(predictor.features, pe, sparse, dense)
                    out["feats"].append(captured[0].float().numpy())
                    out["preds"].append(iou_pred.float().numpy())
                    up = model.postprocess_masks(low, predictor.input_size, predictor.original_size)
                    k = up.shape[1]
                    if gt_rles is not None:
                        masks = (up > model.mask_threshold).reshape(-1, h, w).numpy()
                        iou = torch.from_numpy(np.asarray(rle_iou(rle_encode(masks), gt_rles), np.float32))
                        iou = iou.reshape(-1, k, len(objects))
                        # a point on an object asks for that object; a point on nothing, for whatever it finds
                        target = iou.max(2).values
                        on = under[i:i + chunk]
                        rows = np.nonzero(on >= 0)[0]
                        target[rows] = iou[rows, :, on[rows]]
                    else:
                        target = torch.zeros(len(c), k)
                    out["trues"].append(target.numpy())
                advance()
    finally:
        hook.remove()
    if not out["feats"]:
        raise ValueError("no scenes to collect from")
    return IouExamples(**{k: np.concatenate(v) for k, v in out.items()})


def iou_head_quality(pred: np.ndarray, examples: IouExamples) -> Dict[str, float]:
    """How well predictions ``pred`` ([N, 4]) serve their two uses on ``examples``.

    ``corr_uniform`` / ``mse_uniform``: Pearson correlation and squared error with the true IoU over the three
    multimask outputs at uniformly drawn points (segment-everything's candidates). ``centre_picked``: at objects'
    centres, the mean true IoU of the multimask output with the highest prediction (the 1-point measure);
    ``centre_oracle``: of the best of the three. ``corr_single``: correlation of the single-mask output's."""
    pred = np.asarray(pred, np.float64)
    t = examples.trues
    uni, cen = examples.kinds == 0, examples.kinds == 1

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and a.std() > 0 and b.std() > 0 else float("nan")

    p3, t3 = pred[uni][:, 1:].ravel(), t[uni][:, 1:].ravel()
    tc = t[cen][:, 1:]
    picked = tc[np.arange(len(tc)), np.argmax(pred[cen][:, 1:], 1)] if len(tc) else np.zeros(0)
    return {"corr_uniform": corr(p3, t3), "mse_uniform": float(np.mean((p3 - t3) ** 2)) if len(p3) else float("nan"),
            "centre_picked": float(picked.mean()) if len(picked) else float("nan"),
            "centre_oracle": float(tc.max(1).mean()) if len(tc) else float("nan"),
            "corr_single": corr(pred[:, 0], t[:, 0])}


def fit_iou_head(head: torch.nn.Module, train: IouExamples, val: Optional[IouExamples] = None, *, epochs: int = 30,
                 lr: float = 1e-3, batch: int = 512, weight_decay: float = 0.01, seed: int = 0,
                 log: Optional[Callable[[Dict[str, Any]], None]] = None) -> Tuple[torch.nn.Module, List[Dict[str, Any]]]:
    """Trains a copy of ``head`` on ``train`` (mean squared error of all four outputs; AdamW, one-cycle schedule).

    Returns the trained copy (float32, eval mode) and one record per epoch (training loss and, with ``val``,
    :func:`iou_head_quality` there); ``log`` is called with each record."""
    if len(train) == 0:
        raise ValueError("no training examples")
    g = torch.Generator().manual_seed(seed)
    head = copy.deepcopy(head).float().train()
    x = torch.from_numpy(np.ascontiguousarray(train.feats, np.float32))
    y = torch.from_numpy(np.ascontiguousarray(train.trues, np.float32))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = (len(x) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch, pct_start=0.1)
    history: List[Dict[str, Any]] = []
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = torch.nn.functional.mse_loss(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        record: Dict[str, Any] = {"epoch": epoch + 1, "train_mse": total / len(x)}
        if val is not None and len(val):
            head.eval()
            with torch.no_grad():
                record.update(iou_head_quality(head(torch.from_numpy(val.feats.astype(np.float32))).numpy(), val))
            head.train()
        history.append(record)
        if log is not None:
            log(record)
    return head.eval(), history


def write_refitted(source: Union[str, Path], head: torch.nn.Module, out: Union[str, Path],
                   record: Optional[Dict[str, Any]] = None) -> Path:
    """Writes ``source``'s weights with the IoU head's tensors replaced by ``head``'s, atomically.

    Every other tensor and header entry is kept, in the source's precision, except the calibrated thresholds
    (the scores' scale changed): they are dropped. ``record`` goes into the header as ``iou_head_refit``."""
    from samantic.models.loading import read_metadata, read_state_dict, save_checkpoint

    state = read_state_dict(source)
    meta = dict(read_metadata(source))
    new = {HEAD_PREFIX + k: v for k, v in head.state_dict().items()}
    missing = sorted(set(new) - set(state))
    if missing:
        raise ValueError(f"{source}: no tensor {missing[0]}: not the weights of this model's mask decoder")
    for k, v in new.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: {k} is {tuple(state[k].shape)}, the refitted head's {tuple(v.shape)}")
        state[k] = v.detach().to(state[k].dtype).contiguous()
    for k in ("thresholds", "thresholds_source"):
        meta.pop(k, None)
    meta["iou_head_refit"] = json.dumps(record or {})
    return save_checkpoint(state, out, metadata=meta)


@dataclass
class IouHeadResult:
    output: Path
    before: Dict[str, float]
    after: Dict[str, float]
    n_train: int
    n_val: int
    seconds: float
    history: List[Dict[str, Any]] = field(default_factory=list)

    def markdown(self) -> str:
        names = {"corr_uniform": "correlation with the true IoU, uniform points (segment-everything's candidates)",
                 "mse_uniform": "squared error there",
                 "centre_picked": "1 point at object centres: true IoU of the output it picks",
                 "centre_oracle": "1 point at object centres: best of three (unchanged)",
                 "corr_single": "correlation, single-mask output"}
        lines = [f"validation prompts: {self.n_val} (training: {self.n_train})", "",
                 "| held-out validation scenes | before | after |", "|---|---|---|"]
        for k, label in names.items():
            lines.append(f"| {label} | {self.before[k]:.4f} | {self.after[k]:.4f} |")
        return "\n".join(lines)


def _cached(cache: Optional[Path], name: str, make: Callable[[], IouExamples],
            log: Callable[[str], None]) -> IouExamples:
    if cache is None:
        return make()
    f = cache / f"{name}.npz"
    if f.exists():
        log(f"examples: {f} (cached)")
        return IouExamples.load(f)
    ex = make()
    cache.mkdir(parents=True, exist_ok=True)
    ex.save(f)
    return ex


def refit_iou_head(model_name: str, out: Union[str, Path], *, checkpoint: Optional[str] = None,
                   first_seed: int = 46_000_000, n_scenes: int = 400, val_seeds: Sequence[int] = range(600, 660),
                   scenes: str = "v1", uniform_points: int = 48, epochs: int = 30, lr: float = 1e-3, seed: int = 0,
                   cache: Optional[Union[str, Path]] = None, progress: bool = True,
                   log: Callable[[str], None] = print) -> IouHeadResult:
    """Refits ``model_name``'s IoU head (its shipped weights, or ``checkpoint``) and writes the weights to ``out``.

    Training scenes: ``n_scenes`` from ``first_seed`` (training seeds, >= 1,000,000); ``val_seeds`` (held-out,
    below it) measure the head before and after. With ``cache``, the collected examples are kept there and a
    rerun with the same settings trains on them at once.

    Raises:
        ValueError: training seeds below 1,000,000 or validation seeds above it, an unknown scene kind, a
            model with SUM's task table, weights that do not fit the model (messages name the file).
    """
    from samantic.models import create_model
    from samantic.models.loading import resolve_checkpoint
    from samantic.models.registry import get_model_entry

    val_seeds = list(val_seeds)
    if first_seed < TRAIN_SEED_START:
        raise ValueError(f"training scenes start at seed {first_seed}, below {TRAIN_SEED_START:,}: those are "
                         "held-out seeds")
    bad = [s for s in val_seeds if s >= TRAIN_SEED_START]
    if bad:
        raise ValueError(f"validation seed {bad[0]} is a training seed (>= {TRAIN_SEED_START:,})")
    if n_scenes < 1 or uniform_points < 1 or epochs < 1:
        raise ValueError("scenes, points and epochs must be at least 1")
    _objects(scenes)
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"{out}: the refitted weights are written as .safetensors")
    reference = checkpoint if checkpoint is not None else get_model_entry(model_name).default_weights
    if reference is None:
        raise ValueError(f"{model_name} ships no weights: give the checkpoint whose IoU head to refit")
    source = resolve_checkpoint(reference)
    t0 = time.perf_counter()
    model = create_model(model_name, checkpoint=str(source)).eval()
    _check_model(model)
    cache = Path(cache) if cache is not None else None
    tag = f"{scenes}_{uniform_points}pts_under"  # targets: IoU with the object under the point, else the best
    log(f"collecting: {len(val_seeds)} validation scenes, {n_scenes} training scenes from seed {first_seed:,}")
    val = _cached(cache, f"val_{tag}_{val_seeds[0]}_{len(val_seeds)}", lambda: collect_iou_examples(
        model, val_seeds, scenes=scenes, uniform_points=uniform_points, seed=1, progress=progress), log)
    train = _cached(cache, f"train_{tag}_{first_seed}_{n_scenes}", lambda: collect_iou_examples(
        model, range(first_seed, first_seed + n_scenes), scenes=scenes, uniform_points=uniform_points, seed=seed,
        progress=progress), log)
    before = iou_head_quality(val.preds, val)
    log("before: " + json.dumps({k: round(v, 4) for k, v in before.items()}))
    head, history = fit_iou_head(model.mask_decoder.iou_prediction_head, train, val, epochs=epochs, lr=lr, seed=seed,
                                 log=lambda r: progress and log(json.dumps({k: round(v, 4) if isinstance(v, float)
                                                                            else v for k, v in r.items()})))
    record = {"source": str(reference), "scenes": scenes,
              "train_seeds": f"{first_seed}:{first_seed + n_scenes}", "val_seeds": f"{val_seeds[0]}:{val_seeds[-1] + 1}",
              "uniform_points": uniform_points, "epochs": epochs, "lr": lr, "seed": seed,
              "before": before, "after": history[-1]}
    path = write_refitted(source, head, out, record)
    # the file's own predictions (its precision, e.g. float16) on the validation scenes
    refitted = create_model(model_name, checkpoint=str(path)).eval()
    with torch.no_grad():
        after = iou_head_quality(refitted.mask_decoder.iou_prediction_head(
            torch.from_numpy(val.feats.astype(np.float32))).numpy(), val)
    return IouHeadResult(path, before, after, len(train), len(val), time.perf_counter() - t0, history)
