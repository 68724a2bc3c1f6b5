"""``samantic train sum``: SUM fine-tuning of a SAM, and the variants of the paper's ablation.

Labelled batches (every SUM task mask of a labelled scene, with its task) and
pseudo-labelled batches (the pool's cached segment-everything masks, task
"unspecified") alternate step by step. What the variants change:

==========  ==========================  ===========================  ===========
variant     loss on pseudo-labels       point prompts                task prompt
==========  ==========================  ===========================  ===========
vanilla     SAM's focal + dice          SAM's (uniform in a region)  no
refine      weighted by ``1 - U``       SAM's                        no
no-task     weighted by ``1 - U``       weighted by ``1 - U``        no
sum         weighted by ``1 - U``       weighted by ``1 - U``        yes
==========  ==========================  ===========================  ===========

``U`` is :class:`~samantic.train.sum_refine.UncertaintyEstimator`'s map, ``|p - r|``
between a pseudo-label's probability and the mask refiner's; "refine" is the
issue's "+ mask refinement (uncertainty used)" column: the refiner's uncertainty
reaches the loss only. Every variant sees the same images, masks and steps.

With the task prompt, a prompt that carries a task trains all three outputs toward its mask
(``task_answers``: a task has one answer; the task embedding is then what tells a part from its
thing at the same click). ``replay`` interleaves plain (v1) scenes with the labelled set, against
forgetting; with the encoder trained, ``anchor_weight`` also distils the encoder's embeddings of those
plain scenes toward the base's, and ``distill_weight`` the outputs of random point prompts on them
(logits and predicted IoUs: segment-everything's masks and scores). They apply to every variant's data alike (task answers only where
there is a task prompt).

By default the image encoder stays frozen (SUM fine-tunes what decodes prompts;
the encoder's features, which U-SAM and SAM-CP's patches read, stay those of the
base model), and the prompt encoder, mask decoder and task table train. The
uncertainty maps are computed once per pool image and cached beside the
pseudo-labels (:class:`UncertaintyCache`), so data workers only read files.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from samantic.train.sam import PARTS, SamTrainConfig, SamTrainer
from samantic.train.sum import (PseudoLabelCache, PseudoLabelled, PseudoLabels, UncertaintyMaskLoss,
                                UncertaintyPointSampler, open_labelled, open_pool, progress_bar)

__all__ = ["REPLAY_SEED", "VARIANTS", "SumTrainConfig", "SumTrainer", "ReplayScenes", "UncertaintyCache", "Variant", "train_sum",
           "parse_task_weights", "with_replay"]

PathLike = Union[str, Path]
UNCERTAINTY_FORMAT = "samantic.sum_uncertainty/1"


@dataclass(frozen=True)
class Variant:
    """What one column of the ablation uses (see the module docstring)."""

    uncertainty_loss: bool
    uncertainty_prompts: bool
    task_prompt: bool

    @property
    def uses_uncertainty(self) -> bool:
        return self.uncertainty_loss or self.uncertainty_prompts


VARIANTS: Dict[str, Variant] = {
    "vanilla": Variant(False, False, False),
    "refine": Variant(True, False, False),
    "no-task": Variant(True, True, False),
    "sum": Variant(True, True, True),
}


@dataclass(frozen=True)
class SumTrainConfig:
    """Options of :func:`train_sum` beyond SAM's recipe (:class:`~samantic.train.sam.SamTrainConfig`).

    Attributes:
        variant: a key of :data:`VARIANTS`.
        task_lr_scale: the task table's learning rate relative to the rest (it starts at zero).
        encoder_lr_scale: the image encoder's learning rate relative to the rest, when it trains (a
            smaller step keeps more of the base's features: the forgetting test).
        points_per_side, pred_iou_thresh, stability_score_thresh: the pseudo-labels' segment-everything
            (None: the model's calibrated thresholds).
        task_answers: with a task prompt, every output of a prompt that carries a task learns its mask
            (:class:`~samantic.train.sam.SamTrainer`'s ``task_answers``); False: best of three, as SAM.
        replay: plain (v1) scenes interleaved with the labelled set, their instances as "unspecified"
            (seeds from :data:`REPLAY_SEED`): what the base was trained on, so the fine-tune keeps it.
        anchor_weight: when the image encoder trains, its embeddings of the replayed plain scenes are
            pulled toward the base encoder's with this weight (relative squared difference; see
            :class:`~samantic.train.sam.SamTrainer`'s ``anchor_encoder``); 0: no such term. Needs ``replay``.
        distill_weight: on the replayed plain scenes, random single-point prompts' outputs (logits and
            predicted IoUs, the trained model asked "unspecified") are pulled toward the base model's with
            this weight (:class:`~samantic.train.sam.SamTrainer`'s ``reference``): what segment-everything
            keeps there, and its stability scores, stay the base's. 0: no such term. Needs ``replay``.
            Measured on sam_nano (``benchmarks/results/sum_distill/``): it did not keep the recall and
            cost the tasks most of their gain; kept as an option for further attempts.
        distill_points: prompts per replayed scene for that term.
        replay_labels: False: the replayed scenes' instances get no mask loss (with ``distill_weight``,
            the base's outputs are their only target; "learning without forgetting" proper).
    """

    variant: str = "sum"
    task_lr_scale: float = 10.0
    encoder_lr_scale: float = 1.0
    points_per_side: int = 16
    pred_iou_thresh: Optional[float] = None
    stability_score_thresh: Optional[float] = None
    task_answers: bool = True
    replay: int = 0
    anchor_weight: float = 0.0
    distill_weight: float = 0.0
    distill_points: int = 16
    replay_labels: bool = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        for name in ("task_lr_scale", "encoder_lr_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if isinstance(self.replay, bool) or not isinstance(self.replay, int) or self.replay < 0:
            raise ValueError(f"replay must be an integer >= 0 (plain scenes), got {self.replay!r}")
        if not self.anchor_weight >= 0:
            raise ValueError(f"anchor_weight must be >= 0, got {self.anchor_weight}")
        if self.anchor_weight > 0 and not self.replay:
            raise ValueError("anchor_weight needs replayed plain scenes (replay > 0): they are the anchored images")
        if not self.distill_weight >= 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
        if self.distill_weight > 0 and not self.replay:
            raise ValueError("distill_weight needs replayed plain scenes (replay > 0): they are the distilled images")
        if isinstance(self.distill_points, bool) or not isinstance(self.distill_points, int) or self.distill_points < 1:
            raise ValueError(f"distill_points must be an integer >= 1, got {self.distill_points!r}")
        if not self.replay_labels and not (self.anchor_weight > 0 or self.distill_weight > 0):
            raise ValueError("replay_labels=False leaves the replayed scenes nothing to train: give them "
                             "anchor_weight or distill_weight")


def parse_task_weights(spec: str) -> Tuple[float, ...]:
    """``"part=3"`` or ``"unspecified=1,part=3"`` -> one weight per task of :data:`~samantic.models.tasks.TASKS`
    (a task not named weighs 1; :class:`~samantic.train.sam.SamTrainConfig`'s ``task_weights``). Empty: ``()``.

    Raises:
        ValueError: an item that is not ``TASK=WEIGHT``, an unknown task, a task named twice, a weight that
            is not a finite number > 0.
    """
    from samantic.models.tasks import TASKS, task_index

    spec = spec.strip()
    if not spec:
        return ()
    weights = [1.0] * len(TASKS)
    named = set()
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"task weights: {item.strip()!r} is not TASK=WEIGHT (e.g. part=3; tasks: {', '.join(TASKS)})")
        t = task_index(name)
        if t in named:
            raise ValueError(f"task weights: {name!r} is given twice")
        named.add(t)
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"task weights: {name}={value.strip()!r} is not a number") from None
        if not (np.isfinite(w) and w > 0):
            raise ValueError(f"task weights: {name}={value.strip()} must be a finite number > 0")
        weights[t] = w
    return tuple(weights)


REPLAY_SEED = 5_000_000  # plain scenes replayed beside the labelled set (training range, apart from the others)


class ReplayScenes:
    """Plain (v1) scenes ``seed`` .. ``seed + n - 1``, their instances "unspecified" (no task) and the
    images marked ``anchor`` (:class:`~samantic.train.sam.Sample`), for :func:`with_replay`."""

    def __init__(self, n: int, seed: int = REPLAY_SEED) -> None:
        from samantic.train.sam import ShapesStream

        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"replay needs at least one plain scene, got {n!r}")
        self.n = n
        self.plain = ShapesStream(seed)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"{self.plain!r}:{self.n}"

    def __getitem__(self, i: int):
        from samantic.train.sam import Sample

        if not 0 <= i < self.n:
            raise IndexError(f"plain scene {i} of {self.n}")
        s = self.plain[i]
        return Sample(s.image, s.masks, anchor=True)


def with_replay(labelled, n: int, seed: int = REPLAY_SEED):
    """``labelled`` with ``n`` plain scenes interleaved (:class:`ReplayScenes`): item ``2j`` is labelled
    item ``j mod len``, item ``2j + 1`` plain scene ``seed + j mod n``.

    Fine-tuning on the new data alone drifts the model away from what it did well (plain scenes'
    instances, and with them its segment-everything scores); replaying a little of the base's
    own training distribution keeps it (the forgetting test). The plain images are the ones an
    ``anchor_weight`` distils toward the base's encoder.
    """
    from samantic.train.sam import MixedStream

    return MixedStream([labelled, ReplayScenes(n, seed)])


# ---------------------------------------------------------------- uncertainty maps, cached


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class UncertaintyCache:
    """U maps of a pseudo-label cache's entries for one refiner: ``<pseudo dir>/u-<12 hex>/<image_sha256>.npz``.

    The key digests the pseudo-label cache's key and the refiner file's SHA-256. An entry holds
    ``u``: uint8 ``[K, H, W]`` (U x 255, rounded), one map per pseudo-label of the image, in
    the entry's order. Called as ``f(image, labels)`` it returns float32 maps in [0, 1], computing
    and writing a missing entry with ``estimator`` (the pool's ground truth is never read).

    Args:
        pseudo: the :class:`~samantic.train.sum.PseudoLabelCache` whose entries the maps belong to.
        estimator: an :class:`~samantic.train.sum_refine.UncertaintyEstimator` (None: read-only).
        refiner_file: the refiner's weights file (its hash is part of the key).
    """

    def __init__(self, pseudo: PseudoLabelCache, estimator, refiner_file: PathLike) -> None:
        self.pseudo = pseudo
        self.estimator = estimator
        self.refiner_sha256 = file_sha256(refiner_file)
        digest = hashlib.sha256(json.dumps({"format": UNCERTAINTY_FORMAT, "pseudo": pseudo.key,
                                            "refiner": self.refiner_sha256}).encode()).hexdigest()[:12]
        self.dir = pseudo.dir / f"u-{digest}"
        self.metadata = {"format": UNCERTAINTY_FORMAT, "pseudo_key": pseudo.key, "refiner": str(refiner_file),
                         "refiner_sha256": self.refiner_sha256}

    def __getstate__(self) -> Dict[str, Any]:  # data workers read entries; they never compute
        state = dict(self.__dict__)
        state["estimator"] = None
        return state

    def path(self, image: np.ndarray) -> Path:
        return self.dir / self.pseudo.path(image).name

    def get(self, image: np.ndarray, labels: PseudoLabels) -> Optional[np.ndarray]:
        path = self.path(image)
        if not path.is_file():
            return None
        try:
            with np.load(path) as z:
                u = z["u"]
        except Exception:  # damaged: recomputed
            return None
        if u.shape != (len(labels),) + tuple(labels.size):
            return None
        return u.astype(np.float32) / 255.0

    def compute(self, image: np.ndarray, labels: PseudoLabels) -> np.ndarray:
        from samantic.io import atomic_write_bytes, atomic_write_json

        if self.estimator is None:
            raise RuntimeError(f"{self.path(image)}: no uncertainty map cached for this image (build the cache "
                               "before training: train_sum does)")
        u = np.clip(np.asarray(self.estimator(image, labels), np.float32), 0.0, 1.0)
        buf = io.BytesIO()
        np.savez_compressed(buf, u=np.round(u * 255).astype(np.uint8))
        if not (self.dir / "meta.json").is_file():
            atomic_write_json(self.dir / "meta.json", self.metadata, indent=2)
        atomic_write_bytes(self.path(image), buf.getvalue())
        return np.round(u * 255) / 255.0

    def __call__(self, image: np.ndarray, labels: PseudoLabels) -> np.ndarray:
        u = self.get(image, labels)
        return self.compute(image, labels) if u is None else u


# ---------------------------------------------------------------- the trainer


class SumTrainer(SamTrainer):
    """:class:`~samantic.train.sam.SamTrainer` whose steps alternate between two datasets:
    even steps draw from ``data`` (the labelled set), odd steps from ``pseudo`` (the pseudo-labelled pool).

    The optimizer puts the task table (``model.task_prompt``, when present and trained) in its own
    group, its learning rate scaled by ``task_lr_scale``, and a trained image encoder in another,
    scaled by ``encoder_lr_scale``.
    """

    def __init__(self, model, config: SamTrainConfig, data, pseudo, *, task_lr_scale: float = 1.0,
                 encoder_lr_scale: float = 1.0, **kw) -> None:
        super().__init__(model, config, data, **kw)
        self.pseudo = pseudo
        table = getattr(model, "task_prompt", None)
        table_params = [] if table is None else [p for p in table.parameters() if p.requires_grad]
        encoder_params = [p for p in model.image_encoder.parameters() if p.requires_grad]
        ids = {id(p) for p in table_params + encoder_params}
        rest = [p for p in self.params if id(p) not in ids]
        groups = [{"params": rest}]
        if encoder_params:
            groups.append({"params": encoder_params, "lr_scale": encoder_lr_scale})
        if table_params:
            # no weight decay: a row of the table that a batch does not use should not shrink to zero
            groups.append({"params": table_params, "lr_scale": task_lr_scale, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)

    def _loader(self, step_value, data=None, seed=None) -> Iterator[Dict[str, torch.Tensor]]:
        labelled = super()._loader(step_value, self.data, self.config.seed)
        pseudo = super()._loader(step_value, self.pseudo, self.config.seed + 1)

        def alternate() -> Iterator[Dict[str, torch.Tensor]]:
            while True:
                yield next(labelled) if self.step % 2 == 0 else next(pseudo)

        return alternate()


LOSS_KEYS = ("focal_weight", "focal_alpha", "focal_gamma", "dice_weight")


def base_loss(model_name: str, checkpoint: Optional[PathLike] = None) -> Dict[str, float]:
    """The mask-loss settings the base weights were trained with, from their header's ``training`` record
    (``samantic train sam`` writes it); :class:`~samantic.train.sam.SamTrainConfig`'s defaults (SAM's) for
    weights without one (official checkpoints).

    Fine-tuning with another loss than the base's reshapes its logits: a focal loss on a model trained
    with cross-entropy softens them, and the stability scores, with segment-everything at the model's
    calibrated thresholds, collapse.
    """
    from samantic.models import get_model_entry, read_metadata, resolve_checkpoint

    defaults = SamTrainConfig()
    out = {k: float(getattr(defaults, k)) for k in LOSS_KEYS}
    source = checkpoint if checkpoint is not None else get_model_entry(model_name).default_weights
    if source is None or not (str(source).startswith("pkg:") or Path(source).is_file()):
        return out  # nothing local to read (a weight tag would download): SAM's recipe
    try:
        meta = read_metadata(resolve_checkpoint(source, model_name=model_name))
        record = json.loads(meta.get("training", "{}"))
    except (OSError, ValueError, TypeError):
        return out
    recipe = record.get("training", {}) if isinstance(record, dict) else {}
    out.update({k: float(recipe[k]) for k in LOSS_KEYS if isinstance(recipe.get(k), (int, float))})
    return out


def _task_hook(model) -> Callable:
    from samantic.models.task_prompt import add_task

    def hook(sparse, dense, tasks):
        return sparse, add_task(dense, tasks, model.task_prompt)

    return hook


@dataclass
class SumTrainResult:
    output: Path
    steps: int
    seconds: float
    log: Path
    data: Dict[str, Any] = field(default_factory=dict)


def train_sum(model, labelled, unlabelled, out: PathLike, train_config: SamTrainConfig,
              sum_config: SumTrainConfig = SumTrainConfig(), *, refiner: Optional[PathLike] = None,
              pseudo_cache: PathLike = "runs/cache/sum", checkpoint: Optional[PathLike] = None,
              device: str = "cpu", workers: int = 1, resume: bool = False, progress: bool = True,
              log: Callable[[str], None] = print) -> SumTrainResult:
    """Fine-tunes ``model`` with SUM (or one of the ablation's variants) and writes ``out``.

    Args:
        model: the base SAM (from :func:`~samantic.models.create_model`); trained in place.
        labelled: ``DIR``, ``shapes-panoptic:SEED[:N]`` or a labelled dataset (:func:`~samantic.train.sum.open_labelled`).
        unlabelled: ``DIR``, ``shapes-panoptic:SEED[:N]`` or an :class:`~samantic.train.sum.UnlabelledPool`.
        out: the weights (``.safetensors``); ``out.ckpt`` (resumable state) and ``out.log.jsonl`` beside it.
        train_config: SAM's recipe (steps, batch, learning rate, trainable parts, ...).
        sum_config: the variant and the pseudo-labels' settings.
        refiner: a trained mask refiner (:func:`~samantic.train.sum_refine.save_refiner`); needed by the
            variants that use uncertainty.
        pseudo_cache: root of the pseudo-label cache (and of the uncertainty maps).
        checkpoint: where the base weights came from, for the record.
        device, workers, resume, progress: as :class:`~samantic.train.sam.SamTrainer`.
        log: where progress lines go.

    Raises:
        ValueError: an unknown variant, a variant with uncertainty and no refiner, an output that is not
            ``.safetensors``.
        FileNotFoundError: a missing refiner file or data folder.
    """
    from samantic.models.task_prompt import attach_task_prompt
    from samantic.train.sum_refine import UncertaintyEstimator, load_refiner

    from samantic.models.tasks import TASKS

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {out}")
    if train_config.task_weights and len(train_config.task_weights) != len(TASKS):
        raise ValueError(f"task_weights must have one weight per task ({', '.join(TASKS)}), "
                         f"got {len(train_config.task_weights)}")
    variant = VARIANTS[sum_config.variant]
    if variant.uses_uncertainty:
        if refiner is None:
            raise ValueError(f"variant {sum_config.variant!r} needs a mask refiner (--refiner; train one with "
                             "benchmarks/sum_uncertainty.py or samantic.train.sum_refine.train_refiner)")
        if not Path(refiner).is_file():
            raise FileNotFoundError(f"{refiner}: no such refiner file")
    labelled = open_labelled(labelled)
    if sum_config.replay:
        labelled = with_replay(labelled, sum_config.replay)
    import copy

    reference = copy.deepcopy(model).eval() if sum_config.distill_weight > 0 else None  # the base, before any step
    anchor = None
    if sum_config.anchor_weight > 0:
        if "image_encoder" not in train_config.trainable:
            raise ValueError("anchor_weight: the image encoder does not train (add it to the trainable parts)")
        # the base's encoder, before any step (shared with the reference: computed once per step)
        anchor = reference.image_encoder if reference is not None else copy.deepcopy(model.image_encoder)
    pool = open_pool(unlabelled)
    model.eval()
    kw = dict(points_per_side=sum_config.points_per_side, pred_iou_thresh=sum_config.pred_iou_thresh,
              stability_score_thresh=sum_config.stability_score_thresh)
    cache = PseudoLabelCache(pseudo_cache, model, checkpoint=checkpoint, **kw)  # keyed by the base model's weights
    ucache = None
    if variant.uses_uncertainty:
        ucache = UncertaintyCache(cache, UncertaintyEstimator(model, load_refiner(refiner)), refiner)
    # pseudo-labels and uncertainty maps of the whole pool, before any weight changes
    t0 = time.perf_counter()
    n_masks = computed = 0
    with torch.no_grad(), progress_bar("pseudo-labels" + (" + U" if ucache else ""), progress, len(pool)) as advance:
        for i in range(len(pool)):
            image = pool[i]
            labels = cache.get(image)
            if labels is None:
                labels = cache.compute(image, pool.key(i))
                computed += 1
            if ucache is not None:
                ucache(image, labels)
            n_masks += len(labels)
            advance()
    data_info = {"img_size": int(model.image_encoder.img_size),
                 "labelled": repr(labelled), "unlabelled": repr(pool), "pseudo_masks": n_masks,
                 "pseudo_key": cache.key, "pseudo_computed": computed, "pseudo_seconds": round(time.perf_counter() - t0, 1),
                 "uncertainty": None if ucache is None else str(ucache.dir)}
    log(f"pool: {len(pool)} images, {n_masks} pseudo-labels ({computed} computed) in {cache.dir}"
        + (f"; uncertainty maps in {ucache.dir}" if ucache else "") + f", {data_info['pseudo_seconds']:.0f} s")
    if n_masks == 0:
        raise ValueError(f"{pool!r}: segment-everything kept no pseudo-label on any pool image "
                         f"(thresholds {cache.metadata['pred_iou_thresh']}/{cache.metadata['stability_score_thresh']})")
    pseudo = PseudoLabelled(pool, cache, uncertainty=ucache)
    hook = None
    if variant.task_prompt:
        attach_task_prompt(model)
        hook = _task_hook(model)
    sampler = UncertaintyPointSampler() if variant.uncertainty_prompts else None
    c = train_config
    loss = UncertaintyMaskLoss(c.focal_weight, c.dice_weight, alpha=c.focal_alpha, gamma=c.focal_gamma) \
        if variant.uncertainty_loss else None
    trainer = SumTrainer(model, c, labelled, pseudo, task_lr_scale=sum_config.task_lr_scale,
                         encoder_lr_scale=sum_config.encoder_lr_scale, sampler=sampler,
                         loss=loss, prompt_hook=hook, device=device, workers=workers,
                         task_answers=variant.task_prompt and sum_config.task_answers,
                         anchor_encoder=anchor, anchor_weight=sum_config.anchor_weight, reference=reference,
                         distill_weight=sum_config.distill_weight, distill_points=sum_config.distill_points,
                         anchor_labels=sum_config.replay_labels)
    result = trainer.train(out, resume=resume, progress=progress)
    # the SUM record goes into the weights' header beside the recipe
    _add_metadata(out, {"sum": json.dumps({"config": asdict(sum_config), "variant": asdict(variant), **data_info,
                                           "refiner": None if refiner is None else str(refiner),
                                           "refiner_sha256": None if ucache is None else ucache.refiner_sha256,
                                           "base_checkpoint": None if checkpoint is None else str(checkpoint)},
                                          default=str)})
    return SumTrainResult(out, result.steps, result.seconds, result.log, data_info)


def _add_metadata(path: Path, extra: Dict[str, str]) -> None:
    from safetensors import safe_open

    from samantic.models import save_checkpoint

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(extra)
    save_checkpoint(state, path, metadata=meta)
