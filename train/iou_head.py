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

``scenes="tasks"`` refits a SUM fine-tune's head to its own question instead (:func:`collect_task_examples`): on
the labelled panoptic scenes, every task mask clicked at its centre and at random pixels inside it, each click
asked with the mask's task, the target each output's IoU with that mask. A fine-tune's head keeps scoring as its
base did while the masks changed under it: picking among the three outputs cost sam_nano_sum v1 0.036 of its
0.811 best-of-three at one click (``benchmarks/results/sum_v9/README.md``). Optional replayed plain scenes
(``replay``, task "unspecified", uniform points and centres as above) keep segment-everything's candidates in view.
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

__all__ = ["IouExamples", "collect_iou_examples", "collect_task_examples", "iou_head_quality", "fit_iou_head",
           "write_refitted", "refit_iou_head", "IouHeadResult", "HEAD_PREFIX", "SCENE_KINDS", "REFIT_KINDS"]

HEAD_PREFIX = "mask_decoder.iou_prediction_head."
SCENE_KINDS = ("v1", "v2")  # v1: shape instances; v2: panoptic entities (things whole, stuff regions)
REFIT_KINDS = SCENE_KINDS + ("tasks",)  # tasks: SUM's task masks of panoptic scenes, each asked with its task
UNIFORM, CENTRE, INSIDE = 0, 1, 2  # where a prompt fell: drawn over the image, an object's centre, inside a mask
_KEYS = ("feats", "preds", "trues", "kinds", "tasks")


@dataclass
class IouExamples:
    """Per prompt: ``feats`` the IoU head's input (the IoU token after the decoder's transformer), ``preds`` the
    head's current four predictions, ``trues`` the true IoU of each of the four masks, ``kinds`` 0 for a uniformly
    drawn point, 1 for an object's (or task mask's) centre, 2 for a random pixel inside a task mask, ``tasks`` the
    SUM task the prompt was asked with (0: unspecified)."""

    feats: np.ndarray
    preds: np.ndarray
    trues: np.ndarray
    kinds: np.ndarray
    tasks: np.ndarray

    def __add__(self, other: "IouExamples") -> "IouExamples":
        return IouExamples(**{k: np.concatenate([getattr(self, k), getattr(other, k)]) for k in _KEYS})

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
            missing = [k for k in _KEYS[:4] if k not in f]
            if missing:
                raise ValueError(f"{path}: not a file of IoU-head examples (no {', '.join(missing)})")
            got = {k: f[k] for k in _KEYS if k in f}
        got.setdefault("tasks", np.zeros(len(got["feats"]), np.int8))  # written before tasks were recorded
        return cls(**got)


def _objects(kind: str) -> Callable[[int], Tuple[np.ndarray, np.ndarray]]:
    if kind not in SCENE_KINDS:
        raise ValueError(f"scenes must be one of {', '.join(SCENE_KINDS)}, got {kind!r}")
    return _CALIBRATION_OBJECTS[kind]


class _Decoder:
    """Decodes point prompts on one image as segment-anything does, recording the IoU head's input and output and
    each of the four masks' IoU with a target mask."""

    def __init__(self, model, chunk: int):
        from segment_anything import SamPredictor

        self.model, self.chunk = model.eval(), chunk
        self.predictor = SamPredictor(model)
        self.pe = model.prompt_encoder.get_dense_pe()
        self.table = getattr(model, "task_prompt", None)
        self.captured: List[torch.Tensor] = []

    def __enter__(self) -> "_Decoder":
        self.hook = self.model.mask_decoder.iou_prediction_head.register_forward_hook(
            lambda mod, inp, out: self.captured.append(inp[0].detach()))
        return self

    def __exit__(self, *exc) -> None:
        self.hook.remove()

    def set_image(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)

    def __call__(self, pts: np.ndarray, tasks: np.ndarray, gt: np.ndarray,
                 target: Callable[[torch.Tensor, slice], torch.Tensor]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``pts`` [N, 2] (x, y in the image), ``tasks`` [N], ``gt`` bool [M, H, W]; ``target(iou, rows)`` turns the
        chunk's IoUs [n, 4, M] with every mask of ``gt`` into [n, 4] targets. Returns (feats, preds, trues)."""
        from samantic.models.task_prompt import add_task
        from samantic.ops import rle_encode, rle_iou

        model, p = self.model, self.predictor
        h, w = p.original_size
        gt_rles = rle_encode(gt) if len(gt) else None
        coords = p.transform.apply_coords(pts.astype(np.float32), p.original_size)
        feats, preds, trues = [], [], []
        for i in range(0, len(pts), self.chunk):
            c = torch.as_tensor(coords[i:i + self.chunk])[:, None, :]
            sparse, dense = model.prompt_encoder(points=(c, torch.ones(len(c), 1, dtype=torch.int)), boxes=None,
                                                 masks=None)
            if self.table is not None:  # each prompt asked with its task, as the predictor and generator do
                dense = add_task(dense, torch.as_tensor(tasks[i:i + self.chunk], dtype=torch.long), self.table)
            self.captured.clear()
            low, iou_pred = model.mask_decoder.predict_masks(p.features, self.pe, sparse, dense)
            feats.append(self.captured[0].float().numpy())
            preds.append(iou_pred.float().numpy())
            up = model.postprocess_masks(low, p.input_size, p.original_size)
            k = up.shape[1]
            if gt_rles is None:
                trues.append(np.zeros((len(c), k), np.float32))
                continue
            masks = (up > model.mask_threshold).reshape(-1, h, w).numpy()
            iou = torch.from_numpy(np.asarray(rle_iou(rle_encode(masks), gt_rles), np.float32)).reshape(-1, k, len(gt))
            trues.append(target(iou, slice(i, i + len(c))).numpy())
        return np.concatenate(feats), np.concatenate(preds), np.concatenate(trues)


def collect_iou_examples(model, seeds: Iterable[int], *, scenes: str = "v1", uniform_points: int = 48,
                         chunk: int = 32, seed: int = 0, task: Union[str, int] = "unspecified",
                         progress: bool = True) -> IouExamples:
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
        task: the SUM task every prompt is asked with, for a model with a task table (segment-everything's
            default: "unspecified"); a model without one ignores it.
    """
    from samantic.models.tasks import task_index

    image_and_objects = _objects(scenes)
    task_id = task_index(task)
    seeds = list(seeds)
    rng = np.random.default_rng(seed)
    out: Dict[str, List[np.ndarray]] = {k: [] for k in _KEYS}
    with _Decoder(model, chunk) as decode, _progress(progress, len(seeds)) as advance, torch.no_grad():
        for s in seeds:
            image, objects = image_and_objects(s)
            h, w = image.shape[:2]
            decode.set_image(image)
            objects = np.asarray(objects, bool).reshape(-1, h, w)
            pts = np.concatenate([
                np.stack([rng.uniform(0, w, uniform_points), rng.uniform(0, h, uniform_points)], 1),
                np.array([centre_point(m) for m in objects], np.float64).reshape(-1, 2)])
            kinds = np.r_[np.full(uniform_points, UNIFORM, np.int8), np.full(len(objects), CENTRE, np.int8)]
            # the object under each point (-1: none); visible masks do not overlap, the first one wins if they do
            px = np.clip(pts.astype(np.int64), 0, [w - 1, h - 1])
            hit = objects[:, px[:, 1], px[:, 0]] if len(objects) else np.zeros((0, len(pts)), bool)
            under = np.where(hit.any(0), hit.argmax(0), -1) if len(objects) else np.full(len(pts), -1)

            def target(iou: torch.Tensor, rows: slice) -> torch.Tensor:
                # a point on an object asks for that object; a point on nothing, for whatever it finds
                t = iou.max(2).values
                on = under[rows]
                r = np.nonzero(on >= 0)[0]
                t[r] = iou[r, :, on[r]]
                return t

            f, p, t = decode(pts, np.full(len(pts), task_id), objects, target)
            for k, v in zip(_KEYS, (f, p, t, kinds, np.full(len(pts), task_id, np.int8))):
                out[k].append(v)
            advance()
    if not out["feats"]:
        raise ValueError("no scenes to collect from")
    return IouExamples(**{k: np.concatenate(v) for k, v in out.items()})


def collect_task_examples(model, seeds: Iterable[int], *, clicks: int = 4, chunk: int = 32, seed: int = 0,
                          progress: bool = True) -> IouExamples:
    """SUM's question on panoptic (v2) scenes: every task mask (:func:`~samantic.train.sum.scene_task_masks`)
    clicked at its centre (kind 1, the 1-point measure's click) and at ``clicks`` pixels drawn uniformly inside it
    (kind 2), each click asked with the mask's task; the target of each of the four outputs is its IoU with that
    mask. A model without a task table is asked every click alike (as ``samantic eval sum`` asks it)."""
    from samantic.train.data.panoptic import render_panoptic
    from samantic.train.sum import scene_task_masks

    seeds = list(seeds)
    rng = np.random.default_rng(seed)
    out: Dict[str, List[np.ndarray]] = {k: [] for k in _KEYS}
    with _Decoder(model, chunk) as decode, _progress(progress, len(seeds)) as advance, torch.no_grad():
        for s in seeds:
            scene = render_panoptic(s)
            masks, tasks = scene_task_masks(scene)
            keep = masks.reshape(len(masks), -1).any(1)
            masks, tasks = masks[keep], tasks[keep]
            if len(masks):
                decode.set_image(scene.image)
                pts, kinds, which = [], [], []
                for j, m in enumerate(masks):
                    ys, xs = np.nonzero(m)
                    pick = rng.integers(0, len(xs), clicks)
                    pts += [centre_point(m)] + [(xs[i] + 0.5, ys[i] + 0.5) for i in pick]
                    kinds += [CENTRE] + [INSIDE] * clicks
                    which += [j] * (1 + clicks)
                which_a = np.array(which)
                f, p, t = decode(np.array(pts, np.float64), tasks[which_a], masks,
                                 lambda iou, rows: iou[torch.arange(len(iou)), :, torch.from_numpy(which_a[rows])])
                for k, v in zip(_KEYS, (f, p, t, np.array(kinds, np.int8), tasks[which_a].astype(np.int8))):
                    out[k].append(v)
            advance()
    if not out["feats"]:
        raise ValueError("no task masks in these scenes")
    return IouExamples(**{k: np.concatenate(v) for k, v in out.items()})


def iou_head_quality(pred: np.ndarray, examples: IouExamples) -> Dict[str, float]:
    """How well predictions ``pred`` ([N, 4]) serve their two uses on ``examples``.

    ``corr_uniform`` / ``mse_uniform``: Pearson correlation and squared error with the true IoU over the three
    multimask outputs at uniformly drawn points (segment-everything's candidates). ``centre_picked``: at objects'
    centres, the mean true IoU of the multimask output with the highest prediction (the 1-point measure);
    ``centre_oracle``: of the best of the three; ``task_picked`` / ``task_oracle``: the same averaged per task
    first (``samantic eval sum``'s task average; ``centre_*`` where every prompt has one task).
    ``corr_single``: correlation of the single-mask output's."""
    pred = np.asarray(pred, np.float64)
    t = examples.trues
    uni, cen = examples.kinds == UNIFORM, examples.kinds == CENTRE

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and a.std() > 0 and b.std() > 0 else float("nan")

    def mean(a: np.ndarray) -> float:
        return float(a.mean()) if len(a) else float("nan")

    p3, t3 = pred[uni][:, 1:].ravel(), t[uni][:, 1:].ravel()
    tc = t[cen][:, 1:]
    picked = tc[np.arange(len(tc)), np.argmax(pred[cen][:, 1:], 1)] if len(tc) else np.zeros(0)
    oracle = tc.max(1) if len(tc) else np.zeros(0)
    task = examples.tasks[cen]
    per_task = [task == k for k in np.unique(task)]
    return {"corr_uniform": corr(p3, t3), "mse_uniform": float(np.mean((p3 - t3) ** 2)) if len(p3) else float("nan"),
            "centre_picked": mean(picked), "centre_oracle": mean(oracle),
            "task_picked": mean(np.array([picked[m].mean() for m in per_task])),
            "task_oracle": mean(np.array([oracle[m].mean() for m in per_task])),
            "corr_single": corr(pred[:, 0], t[:, 0])}


def fit_iou_head(head: torch.nn.Module, train: IouExamples, val: Optional[IouExamples] = None, *, epochs: int = 30,
                 lr: float = 1e-3, batch: int = 512, weight_decay: float = 0.01, seed: int = 0,
                 centre_weight: float = 1.0,
                 log: Optional[Callable[[Dict[str, Any]], None]] = None) -> Tuple[torch.nn.Module, List[Dict[str, Any]]]:
    """Trains a copy of ``head`` on ``train`` (mean squared error of all four outputs; AdamW, one-cycle schedule).

    ``centre_weight``: how much a click at an object's (or task mask's) centre counts in the loss against any other
    prompt (the 1-point measure clicks there). Returns the trained copy (float32, eval mode) and one record per
    epoch (training loss and, with ``val``, :func:`iou_head_quality` there); ``log`` is called with each record."""
    if len(train) == 0:
        raise ValueError("no training examples")
    if not centre_weight > 0:
        raise ValueError(f"centre_weight must be positive, got {centre_weight}")
    g = torch.Generator().manual_seed(seed)
    head = copy.deepcopy(head).float().train()
    x = torch.from_numpy(np.ascontiguousarray(train.feats, np.float32))
    y = torch.from_numpy(np.ascontiguousarray(train.trues, np.float32))
    w = torch.from_numpy(np.where(train.kinds == CENTRE, centre_weight, 1.0).astype(np.float32))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = (len(x) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch, pct_start=0.1)
    history: List[Dict[str, Any]] = []
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            err = ((head(x[idx]) - y[idx]) ** 2).mean(1)
            loss = (w[idx] * err).sum() / w[idx].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(err.detach().sum())
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
    """``before`` / ``after``: :func:`iou_head_quality` on the validation scenes of the refit's kind (``scenes``);
    ``plain``: (before, after) on held-out plain scenes, when plain scenes were replayed beside SUM's tasks."""

    output: Path
    before: Dict[str, float]
    after: Dict[str, float]
    n_train: int
    n_val: int
    seconds: float
    history: List[Dict[str, Any]] = field(default_factory=list)
    n_tasks: int = 1
    scenes: str = "v1"
    plain: Optional[Tuple[Dict[str, float], Dict[str, float]]] = None

    def markdown(self) -> str:
        names = {"corr_uniform": "correlation with the true IoU, uniform points (segment-everything's candidates)",
                 "mse_uniform": "squared error there",
                 "centre_picked": "1 point at centres: true IoU of the output it picks",
                 "centre_oracle": "1 point at centres: best of three (unchanged)",
                 "task_picked": "the same, averaged per task first (`samantic eval sum`'s task average)",
                 "task_oracle": "its best of three (unchanged)",
                 "corr_single": "correlation, single-mask output"}
        what = {"v1": "plain scenes", "v2": "panoptic scenes", "tasks": "panoptic scenes, task masks"}
        groups = [(what.get(self.scenes, self.scenes), self.before, self.after, self.n_tasks)]
        if self.plain is not None:
            groups.append(("plain scenes, asked 'unspecified'", *self.plain, 1))
        lines = [f"validation prompts: {self.n_val} (training: {self.n_train})", "",
                 "| held-out validation scenes | | before | after |", "|---|---|---|---|"]
        for group, before, after, n_tasks in groups:
            for k, label in names.items():
                if (k.startswith("task_") and n_tasks < 2) or (np.isnan(before[k]) and np.isnan(after[k])):
                    continue  # one task: the same as the centre rows; no prompts of that kind
                lines.append(f"| {group} | {label} | {before[k]:.4f} | {after[k]:.4f} |")
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


def _finite(d: Dict[str, Any]) -> Dict[str, Any]:
    """NaN (no prompts of a kind) as null, so the header stays strict JSON."""
    return {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in d.items()}


def refit_iou_head(model_name: str, out: Union[str, Path], *, checkpoint: Optional[str] = None,
                   first_seed: Optional[int] = None, n_scenes: Optional[int] = None,
                   val_seeds: Sequence[int] = range(600, 660), scenes: str = "v1", uniform_points: int = 48,
                   clicks: int = 4, replay: int = 0, replay_seed: int = 46_000_000, epochs: int = 30,
                   lr: float = 1e-3, centre_weight: float = 1.0, seed: int = 0,
                   cache: Optional[Union[str, Path]] = None, progress: bool = True, log: Callable[[str], None] = print) -> IouHeadResult:
    """Refits ``model_name``'s IoU head (its shipped weights, or ``checkpoint``) and writes the weights to ``out``.

    Training scenes: ``n_scenes`` from ``first_seed`` (training seeds, >= 1,000,000; default 400 plain or panoptic
    scenes from 46,000,000, or for ``scenes="tasks"`` SUM's labelled set, 120 from 3,000,000); ``val_seeds``
    (held-out, below it) measure the head before and after. ``scenes="tasks"``: :func:`collect_task_examples` with
    ``clicks`` random clicks per mask besides its centre, plus ``replay`` plain scenes from ``replay_seed``
    (:func:`collect_iou_examples`, task "unspecified", ``uniform_points`` per scene; validated on as many held-out
    plain scenes as ``val_seeds``). ``centre_weight``: see :func:`fit_iou_head`. With ``cache``, the collected
    examples are kept there and a rerun with the same settings trains on them at once.

    Raises:
        ValueError: training seeds below 1,000,000 or validation seeds above it, an unknown scene kind, plain or
            panoptic scenes for a model with SUM's task table (its head serves every task), weights that do not
            fit the model (messages name the file).
    """
    from samantic.models import create_model
    from samantic.models.loading import resolve_checkpoint
    from samantic.models.registry import get_model_entry
    from samantic.train.sum import LABELLED_SEED

    if scenes not in REFIT_KINDS:
        raise ValueError(f"scenes must be one of {', '.join(REFIT_KINDS)}, got {scenes!r}")
    tasks = scenes == "tasks"
    if first_seed is None:
        first_seed = LABELLED_SEED if tasks else 46_000_000
    if n_scenes is None:
        n_scenes = 120 if tasks else 400
    val_seeds = list(val_seeds)
    for name, start in (("training scenes", first_seed), ("replayed plain scenes", replay_seed if replay else None)):
        if start is not None and start < TRAIN_SEED_START:
            raise ValueError(f"{name} start at seed {start}, below {TRAIN_SEED_START:,}: those are held-out seeds")
    bad = [s for s in val_seeds if s >= TRAIN_SEED_START]
    if bad:
        raise ValueError(f"validation seed {bad[0]} is a training seed (>= {TRAIN_SEED_START:,})")
    if not val_seeds:
        raise ValueError("no validation seeds")
    if n_scenes < 1 or uniform_points < 1 or epochs < 1 or clicks < 0 or replay < 0:
        raise ValueError("scenes, points and epochs must be at least 1, clicks and replay at least 0")
    if replay and not tasks:
        raise ValueError("replayed plain scenes go with scenes='tasks' (the other kinds are plain scenes already)")
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"{out}: the refitted weights are written as .safetensors")
    reference = checkpoint if checkpoint is not None else get_model_entry(model_name).default_weights
    if reference is None:
        raise ValueError(f"{model_name} ships no weights: give the checkpoint whose IoU head to refit")
    source = resolve_checkpoint(reference)
    t0 = time.perf_counter()
    model = create_model(model_name, checkpoint=str(source)).eval()
    if not tasks and getattr(model, "task_prompt", None) is not None:
        raise ValueError(f"{source}: this model has SUM's task table and one IoU head serves every task; refit it "
                         "on its tasks (scenes 'tasks', with replayed plain scenes for segment-everything) instead "
                         f"of on {scenes} scenes alone")
    cache = Path(cache) if cache is not None else None
    train_range = range(first_seed, first_seed + n_scenes)
    v0, nv = val_seeds[0], len(val_seeds)
    log(f"collecting: {nv} validation scenes, {n_scenes} training scenes from seed {first_seed:,}"
        + (f", {replay} replayed plain scenes from seed {replay_seed:,}" if replay else ""))
    plain_val: Optional[IouExamples] = None
    if tasks:
        tag = f"tasks_{clicks}clicks"  # targets: each output's IoU with the clicked task mask
        val = _cached(cache, f"val_{tag}_{v0}_{nv}", lambda: collect_task_examples(
            model, val_seeds, clicks=clicks, seed=1, progress=progress), log)
        train = _cached(cache, f"train_{tag}_{first_seed}_{n_scenes}", lambda: collect_task_examples(
            model, train_range, clicks=clicks, seed=seed, progress=progress), log)
        if replay:
            ptag = f"v1_{uniform_points}pts_under_unspecified"
            plain_val = _cached(cache, f"val_{ptag}_{v0}_{nv}", lambda: collect_iou_examples(
                model, val_seeds, uniform_points=uniform_points, seed=1, progress=progress), log)
            train = train + _cached(cache, f"train_{ptag}_{replay_seed}_{replay}", lambda: collect_iou_examples(
                model, range(replay_seed, replay_seed + replay), uniform_points=uniform_points, seed=seed,
                progress=progress), log)
    else:
        tag = f"{scenes}_{uniform_points}pts_under"  # targets: IoU with the object under the point, else the best
        val = _cached(cache, f"val_{tag}_{v0}_{nv}", lambda: collect_iou_examples(
            model, val_seeds, scenes=scenes, uniform_points=uniform_points, seed=1, progress=progress), log)
        train = _cached(cache, f"train_{tag}_{first_seed}_{n_scenes}", lambda: collect_iou_examples(
            model, train_range, scenes=scenes, uniform_points=uniform_points, seed=seed, progress=progress), log)
    before = iou_head_quality(val.preds, val)
    log("before: " + json.dumps({k: round(v, 4) for k, v in before.items()}))
    head, history = fit_iou_head(model.mask_decoder.iou_prediction_head, train, val, epochs=epochs, lr=lr, seed=seed,
                                 centre_weight=centre_weight,
                                 log=lambda r: progress and log(json.dumps({k: round(v, 4) if isinstance(v, float)
                                                                            else v for k, v in r.items()})))
    record = {"source": str(reference), "scenes": scenes,
              "train_seeds": f"{first_seed}:{first_seed + n_scenes}", "val_seeds": f"{v0}:{val_seeds[-1] + 1}",
              "uniform_points": uniform_points, "epochs": epochs, "lr": lr, "centre_weight": centre_weight,
              "seed": seed, "before": _finite(before), "after": _finite(history[-1])}
    if tasks:
        record.update(clicks=clicks, replay=f"{replay_seed}:{replay_seed + replay}" if replay else None)
    path = write_refitted(source, head, out, record)
    # the file's own predictions (its precision, e.g. float16) on the validation scenes
    refitted = create_model(model_name, checkpoint=str(path)).eval().mask_decoder.iou_prediction_head

    def quality(ex: IouExamples) -> Dict[str, float]:
        with torch.no_grad():
            return iou_head_quality(refitted(torch.from_numpy(ex.feats.astype(np.float32))).numpy(), ex)

    plain = (iou_head_quality(plain_val.preds, plain_val), quality(plain_val)) if plain_val is not None else None
    return IouHeadResult(path, before, quality(val), len(train), len(val) + (len(plain_val) if plain else 0),
                         time.perf_counter() - t0, history, n_tasks=len(np.unique(val.tasks[val.kinds == CENTRE])),
                         scenes=scenes, plain=plain)
