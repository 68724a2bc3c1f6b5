"""Training SAM-CP: patch-to-segment assignment from the patch cache, Hungarian matching, losses, the loop.

Data flow (one image)::

    patch cache entry (samantic.train.samcp_cache): patches (RLE, box) + overlaps with the GT
        -> membership [P, G] in {1 positive, 0 negative, -1 ignored}   (assign_patches)
        -> class membership [C, P] of the Type-I queries                (class_membership)
    image + patch boxes + 7x7 patch masks -> SamcpHead -> affinities and class logits per stage
        -> Type-II queries matched one-to-one to GT things (Hungarian; class, affinity focal,
           affinity dice and a locality cost)
        -> losses on every stage: sigmoid focal classification, focal + dice on the affinity rows
           of matched Type-II queries and of the Type-I (class) queries, presence of each class.

A patch is a positive member of a GT segment when at least ``pos_thresh`` (0.8) of the patch
lies inside the segment, for its mask and for its box; a negative one when less than
``neg_thresh`` (0.5) of its mask does; in between it is ignored (no loss). A segment that
no patch joins gets its best patch by IoU as a positive (if that patch is not already a
member of another segment), so every GT has a patch whenever SAM found anything of it.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from samantic.io.signals import HeldSignals

__all__ = [
    "SamcpTrainConfig",
    "SamcpExample",
    "SamcpTrainer",
    "assign_patches",
    "class_membership",
    "example_from_patches",
    "hungarian_match",
    "load_examples",
    "parse_stages",
    "samcp_losses",
    "stage_output",
    "train_stages",
]


# ---------------------------------------------------------------- config


@dataclass
class SamcpTrainConfig:
    """Options of :class:`SamcpTrainer`.

    Attributes:
        steps: optimizer steps in total (a resumed run continues up to this).
        images_per_step: images per optimizer step.
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW, linear warm-up, cosine decay.
        grad_clip: max gradient norm (0 disables).
        pos_thresh, neg_thresh: patch membership thresholds (intersection over patch).
        class_weight, focal_weight, dice_weight, presence_weight: loss weights (Mask2Former's 2 / 5 / 5).
        locality_weight: matching cost added when a Type-II query's own patch is not a positive
            member of the GT (a query stands for the instance of its patch).
        one_to_many: besides the one-to-one matched queries, every query whose own patch is a
            member of a thing is trained as that thing (class and affinity row), and queries
            whose patch lies half in a thing get no class loss. With one-to-one matching
            alone the class scores stayed undecided (about 0.1 for every class after 1200
            steps on 300 scenes): which of an instance's look-alike patch queries is "the one"
            is arbitrary. Duplicates are removed at inference (NMS, panoptic fusion).
        flip_prob: probability of a horizontal flip of an image with its patches.
        patch_drop: fraction of an image's patches left out of a step, drawn anew each step
            (at least one kept; a thing left without a member patch sits the step out): a
            regulariser against memorising whole scenes, whose patch sets repeat every epoch.
        crop_scale: random zoom-in: half the images of a step are cropped to a window whose sides
            are a fraction in ``[crop_scale, 1]`` of the image's (the head scales it back up to its
            input size); patches cut by the window keep the part inside (box clipped, mask
            resampled), those left with under a quarter of their box leave the step. 1: off.
        color_perm: probability that an image of a step has its colour channels permuted (one of the five
            other orders, drawn per image and step): stuff and things must then be told apart by texture and
            shape, not by colour alone (a teal water region is not grass, a green wall is not grass). 0: off.
        checkpoint_every, log_every: steps between resumable checkpoints / log lines.
        seed: data order, augmentation and initialisation.
        time_budget: seconds of training (0: no limit); the cosine decay then follows time.
    """

    steps: int = 3000
    images_per_step: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    pos_thresh: float = 0.8
    neg_thresh: float = 0.5
    class_weight: float = 2.0
    focal_weight: float = 5.0
    dice_weight: float = 5.0
    presence_weight: float = 1.0
    locality_weight: float = 2.0
    one_to_many: bool = True
    flip_prob: float = 0.5
    patch_drop: float = 0.0
    crop_scale: float = 1.0
    color_perm: float = 0.0
    checkpoint_every: int = 200
    log_every: int = 20
    seed: int = 0
    time_budget: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "images_per_step", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.neg_thresh <= self.pos_thresh <= 1.0:
            raise ValueError(f"need 0 <= neg_thresh <= pos_thresh <= 1, got {self.neg_thresh}, {self.pos_thresh}")
        if self.time_budget < 0:
            raise ValueError(f"time_budget must be >= 0 seconds, got {self.time_budget}")
        if not 0.0 <= self.patch_drop < 1.0:
            raise ValueError(f"patch_drop must be in [0, 1), got {self.patch_drop}")
        if not 0.0 < self.crop_scale <= 1.0:
            raise ValueError(f"crop_scale must be in (0, 1], got {self.crop_scale}")
        if not 0.0 <= self.color_perm <= 1.0:
            raise ValueError(f"color_perm must be in [0, 1], got {self.color_perm}")


# ---------------------------------------------------------------- assignment


def assign_patches(iop: np.ndarray, box_iop: np.ndarray, iou: np.ndarray, pos_thresh: float = 0.8,
                   neg_thresh: float = 0.5) -> np.ndarray:
    """Patch-to-segment membership from the cached overlaps.

    Args:
        iop, box_iop, iou: ``[P, G]`` intersection over patch (mask, box) and IoU.
        pos_thresh: a patch is a member when ``iop`` and ``box_iop`` reach it.
        neg_thresh: a patch is not a member when ``iop`` is below it.

    Returns:
        int8 ``[P, G]``: 1 member, 0 not a member, -1 ignored. Every segment with any
        overlap gets at least one member (its best patch by IoU, if that patch is a member
        of no other segment).
    """
    iop = np.asarray(iop, np.float32)
    p, g = iop.shape
    out = np.full((p, g), -1, np.int8)
    out[iop < neg_thresh] = 0
    out[(iop >= pos_thresh) & (np.asarray(box_iop) >= pos_thresh)] = 1
    if p and g:
        iou = np.asarray(iou, np.float32)
        taken = (out == 1).any(1)
        for j in np.flatnonzero(~(out == 1).any(0)):
            order = np.argsort(-iou[:, j], kind="stable")
            for i in order:
                if iou[i, j] <= 0:
                    break
                if not taken[i]:
                    out[i, :] = np.where(out[i, :] == 1, 1, 0)
                    out[i, j] = 1
                    taken[i] = True
                    break
    return out


def class_membership(iop: np.ndarray, gt_classes: np.ndarray, num_classes: int, pos_thresh: float = 0.8,
                     neg_thresh: float = 0.5, membership: Optional[np.ndarray] = None) -> np.ndarray:
    """Type-I targets: int8 ``[C, P]`` (1 the patch is of class c, 0 not, -1 ignored).

    The fraction of a patch inside class ``c`` is the sum of its intersections over patch with the
    segments of class ``c`` (segments are disjoint). Patches that ``membership`` makes members of a
    segment (the fallback included) count as members of its class.
    """
    iop = np.asarray(iop, np.float32)
    p = iop.shape[0]
    out = np.zeros((num_classes, p), np.int8)
    for c in range(num_classes):
        sel = np.asarray(gt_classes) == c
        if not sel.any():
            continue
        frac = iop[:, sel].sum(1)
        row = np.full(p, -1, np.int8)
        row[frac < neg_thresh] = 0
        row[frac >= pos_thresh] = 1
        if membership is not None:
            row[(membership[:, sel] == 1).any(1)] = 1
        out[c] = row
    return out


# ---------------------------------------------------------------- examples


@dataclass
class SamcpExample:
    """One training image with its patches and targets (numpy, CPU)."""

    key: str
    image: np.ndarray            # uint8 [H, W, 3]
    boxes: np.ndarray            # float32 [P, 4] xyxy (max exclusive)
    roi_masks: np.ndarray        # float32 [P, r, r]
    membership: np.ndarray       # int8 [P, G]
    gt_classes: np.ndarray       # int64 [G], index into the head's vocabulary (-1: not in it)
    gt_isthing: np.ndarray       # bool [G]
    class_targets: np.ndarray    # int8 [C, P]
    class_known: Optional[np.ndarray] = None  # bool [C]: classes the image is annotated for (None: all)

    def flipped(self) -> "SamcpExample":
        w = self.image.shape[1]
        boxes = self.boxes.copy()
        boxes[:, 0], boxes[:, 2] = w - self.boxes[:, 2], w - self.boxes[:, 0]
        return SamcpExample(self.key, np.ascontiguousarray(self.image[:, ::-1]), boxes,
                            np.ascontiguousarray(self.roi_masks[:, :, ::-1]), self.membership, self.gt_classes,
                            self.gt_isthing, self.class_targets, self.class_known)

    def subset(self, keep: np.ndarray) -> "SamcpExample":
        """The example with only the patches ``keep`` (bool ``[P]``); a thing none of whose member
        patches is kept leaves the instance targets (its class becomes -1)."""
        keep = np.asarray(keep, bool)
        membership = self.membership[keep]
        gt_classes = self.gt_classes.copy()
        lost = self.gt_isthing & ~(membership == 1).any(0)
        gt_classes[lost] = -1
        return SamcpExample(self.key, self.image, self.boxes[keep], self.roi_masks[keep], membership, gt_classes,
                            self.gt_isthing, self.class_targets[:, keep], self.class_known)

    def cropped(self, x0: int, y0: int, x1: int, y1: int, min_keep: float = 0.25) -> "SamcpExample":
        """The example seen through the window ``[x0, x1) x [y0, y1)`` (pixels).

        A patch cut by the window keeps its part inside: the box is clipped and its RoI mask
        resampled over the clipped box. Patches left with less than ``min_keep`` of their box
        area leave the example as in :meth:`subset` (the one with the most inside stays if all
        would leave; a window that misses every patch is an error). Targets are the full image's:
        a patch's membership is a property of the whole patch.
        """
        h, w = self.image.shape[:2]
        x0, y0, x1, y1 = max(0, int(x0)), max(0, int(y0)), min(w, int(x1)), min(h, int(y1))
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise ValueError(f"empty crop window ({x0}, {y0}, {x1}, {y1}) of a {w}x{h} image")
        b = self.boxes.astype(np.float64)
        clipped = np.clip(b, [x0, y0, x0, y0], [x1, y1, x1, y1])
        area = np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)
        inside = np.maximum(clipped[:, 2] - clipped[:, 0], 0) * np.maximum(clipped[:, 3] - clipped[:, 1], 0)
        if not (inside > 0).any():
            raise ValueError(f"no patch of {self.key} lies in the crop window ({x0}, {y0}, {x1}, {y1})")
        keep = (inside > 0) & (inside >= min_keep * np.maximum(area, 1e-9))
        if not keep.any():  # keep the patch with the most of its box inside: a step needs a patch
            keep[int(np.argmax(inside / np.maximum(area, 1e-9)))] = True
        ex = self.subset(keep)
        b, c = b[keep], clipped[keep]
        roi = ex.roi_masks
        cut = np.any(np.abs(c - b) > 1e-6, 1)
        if cut.any():
            from samantic.heads.samcp import mask_to_roi

            # the clipped box in the RoI mask's own pixels, resampled like the full-image masks were
            r = roi.shape[-1]
            size = np.maximum(b[cut, 2:] - b[cut, :2], 1e-6)
            win = (c[cut] - np.tile(b[cut, :2], 2)) / np.tile(size, 2) * r
            roi = roi.copy()
            roi[cut] = mask_to_roi(torch.from_numpy(np.ascontiguousarray(roi[cut])), torch.from_numpy(win), size=r).numpy()
        boxes = (c - np.array([x0, y0, x0, y0], np.float64)).astype(np.float32)
        image = np.ascontiguousarray(self.image[y0:y1, x0:x1])
        return SamcpExample(self.key, image, boxes, roi, ex.membership, ex.gt_classes,
                            ex.gt_isthing, ex.class_targets, ex.class_known)


def example_from_patches(key: str, image: np.ndarray, entry: Any, vocabulary: Sequence[str],
                         categories: Sequence[dict], roi_size: int = 7, pos_thresh: float = 0.8,
                         neg_thresh: float = 0.5, stuff_annotated: bool = True) -> SamcpExample:
    """A training example from an image and its patch cache entry (:class:`~samantic.train.samcp_cache.Patches`).

    ``vocabulary`` is the head's ``classes + stuff``; ``categories`` the dataset's COCO categories,
    whose names map the entry's ``gt_categories`` onto it (segments of other categories get -1:
    their patches are negatives of every class).

    ``stuff_annotated=False`` (v1 scenes: things only) leaves the stuff classes of ``categories``
    unknown in this image: their Type-I rows and presence get no loss, rather than teaching that
    nothing here is wall or grass.
    """
    names = {int(c["id"]): c["name"] for c in categories}
    index = {n: i for i, n in enumerate(vocabulary)}
    gt_classes = np.array([index.get(names.get(int(c), ""), -1) for c in entry.gt_categories], np.int64)
    from samantic.heads.samcp import patch_inputs

    membership = assign_patches(entry.iop, entry.box_iop, entry.iou, pos_thresh, neg_thresh)
    boxes, roi = patch_inputs(entry.patch_rles, entry.patch_boxes, entry.size, roi_size)
    class_targets = class_membership(entry.iop, gt_classes, len(vocabulary), pos_thresh, neg_thresh, membership)
    known = None
    if not stuff_annotated:
        stuff = {c["name"] for c in categories if not c.get("isthing", 1)}
        known = np.array([n not in stuff for n in vocabulary], bool)
        class_targets[~known] = -1
    return SamcpExample(key, image, boxes, roi, membership, gt_classes, np.asarray(entry.gt_isthing, bool),
                        class_targets, known)


def load_examples(model, dataset, cache_dir, vocabulary: Sequence[str], *, roi_size: int = 7,
                  points_per_side: int = 32, pred_iou_thresh: Optional[float] = None,
                  stability_score_thresh: Optional[float] = None, pos_thresh: float = 0.8, neg_thresh: float = 0.5,
                  progress: bool = True, on_error=None) -> Tuple[List[SamcpExample], Any]:
    """Builds (or reuses) the patch cache of ``dataset`` and turns every entry into an example.

    ``roi_size`` is the side of the examples' patch masks: the head's ``info.mask_side`` (its RoI
    grid, or the finer ``mask_size``).

    Returns:
        (examples, the cache's :class:`~samantic.train.samcp_cache.CacheReport`).
    """
    from samantic.train.samcp_cache import build_patch_cache, open_panoptic

    data = open_panoptic(dataset)
    categories = data.categories
    examples = []

    def take(sample, entry):  # each image as the cache walks the dataset: loaded (rendered) and read once
        examples.append(example_from_patches(sample.key, sample.image, entry, vocabulary, categories, roi_size,
                                             pos_thresh, neg_thresh, sample.stuff_annotated))

    report = build_patch_cache(model, data, cache_dir, points_per_side=points_per_side,
                               pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
                               progress=progress, on_error=on_error, on_entry=take)
    return examples, report


# SamcpInfo options whose modules start as the identity (zero output): `--init` may add them to a head without them
GROWN_OPTIONS = ("texture_channels",)
GROWN_MODULES = ("roi_embed.texture_reduce.", "roi_embed.texture_mlp.")


def init_from_head(head, path) -> str:
    """Starts ``head`` from the weights of a trained SAM-CP head file (fine-tuning: more scenes,
    another SAM's patches) and returns the file's SHA-256.

    The file must describe the same head: the same vocabulary (classes, then stuff, in order) and
    the same architecture (``SamcpInfo.config``), except that the run may add texture statistics
    (``texture_channels``: their weights start from zero output, so the head starts as the file's).
    Its thresholds and other header entries are not taken: the new run's file gets its own (tune it
    again after training).

    Raises:
        ValueError: naming the file and what differs (or why it cannot be read).
    """
    from samantic.heads.samcp import TEXT_ENCODER_KEY, TEXT_TEMPLATE_KEY, load_samcp
    from samantic.models.weights import file_sha256

    path = Path(path)
    init = load_samcp(path)  # errors name the file
    theirs, ours = init.info, head.info
    diffs = []
    if tuple(theirs.names) != tuple(ours.names):
        diffs.append(f"classes {list(theirs.names)} against {list(ours.names)}")
    a, b = theirs.config(), ours.config()
    # options that add modules whose output starts at zero: a head without them may start one with them
    grown = [k for k in GROWN_OPTIONS if k not in a and b.get(k)]
    diffs += [f"{k} {a.get(k)!r} against {b.get(k)!r}" for k in sorted(set(a) | set(b))
              if a.get(k) != b.get(k) and k not in grown]
    for key in (TEXT_ENCODER_KEY, TEXT_TEMPLATE_KEY):  # text queries: the same names encoded the same way
        if theirs.extra.get(key) != ours.extra.get(key):
            diffs.append(f"{key} {theirs.extra.get(key)!r} against {ours.extra.get(key)!r}")
    if diffs:
        raise ValueError(f"{path}: cannot start from this head, it differs from the one being trained "
                         f"(the file's against this run's: {'; '.join(diffs)})")
    missing, unexpected = head.load_state_dict(init.state_dict(), strict=not grown)
    if unexpected or any(not k.startswith(GROWN_MODULES) for k in missing):  # a bug, not the user's file
        raise RuntimeError(f"{path}: starting weights do not fit: missing {missing}, unexpected {unexpected}")
    return file_sha256(path)


# ---------------------------------------------------------------- matching and losses


def _focal(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Elementwise sigmoid focal loss."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    pt = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - pt) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def _dice(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Dice loss per row over the weighted (non-ignored) entries: ``[..., P] -> [...]``."""
    p = logits.sigmoid() * weight
    t = targets * weight
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def _pair_costs(aff: torch.Tensor, member: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Focal and dice costs ``[Q, G]`` between affinity rows ``[Q, P]`` and membership columns ``[P, G]``."""
    t = (member == 1).float().t()                 # [G, P]
    w = (member >= 0).float().t()                 # [G, P]
    pos = _focal(aff, torch.ones_like(aff))       # [Q, P]
    neg = _focal(aff, torch.zeros_like(aff))
    focal = (pos @ (t * w).t() + neg @ ((1 - t) * w).t()) / w.sum(1).clamp(min=1)[None]
    p = aff.sigmoid()
    num = 2 * (p @ (t * w).t()) + 1
    den = (p @ w.t()) + (t * w).sum(1)[None] + 1
    return focal, 1 - num / den


def hungarian_match(class_logits: torch.Tensor, aff: torch.Tensor, member: torch.Tensor, gt_classes: torch.Tensor,
                    config: SamcpTrainConfig) -> Tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of Type-II queries to GT things.

    Args:
        class_logits: ``[Q, C + 1]``; aff: ``[Q, P]`` affinity logits (query q is patch q);
        member: int8 ``[P, G]`` membership of the things; gt_classes: ``[G]``.

    Returns:
        (query indices, GT indices), as ``scipy.optimize.linear_sum_assignment`` gives them.
    """
    from scipy.optimize import linear_sum_assignment

    if member.shape[1] == 0 or aff.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    with torch.no_grad():
        prob = class_logits.float().sigmoid()[:, gt_classes]                  # [Q, G]
        alpha, gamma = 0.25, 2.0
        pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        neg = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
        cost_class = pos - neg
        focal, dice = _pair_costs(aff.float(), member)
        q = aff.shape[0]
        local = (member[:q] != 1).float()                                    # [Q, G]
        cost = (config.class_weight * cost_class + config.focal_weight * focal + config.dice_weight * dice
                + config.locality_weight * local)
    qi, gi = linear_sum_assignment(cost.cpu().numpy())
    return qi.astype(np.int64), gi.astype(np.int64)


def samcp_losses(out, batch: Sequence[SamcpExample], config: SamcpTrainConfig) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Total loss over every decoder stage and image, and its parts (for the log)."""
    c = out.num_classes
    totals = {"class": 0.0, "focal": 0.0, "dice": 0.0, "sem_focal": 0.0, "sem_dice": 0.0, "presence": 0.0}
    loss = out.affinity[0].new_zeros(())
    stages = len(out.affinity)
    for b, ex in enumerate(batch):
        p = ex.boxes.shape[0]
        if p == 0:
            continue
        device = out.affinity[0].device
        things = np.flatnonzero(ex.gt_isthing & (ex.gt_classes >= 0))
        member = torch.from_numpy(ex.membership[:, things]).to(device)                    # [P, G]
        gt_cls = torch.from_numpy(ex.gt_classes[things]).to(device)
        sem = torch.from_numpy(ex.class_targets).to(device)                               # [C, P]
        sem_t, sem_w = (sem == 1).float(), (sem >= 0).float()
        present = (sem == 1).any(1).float()
        known = (torch.ones(c, device=device) if ex.class_known is None
                 else torch.from_numpy(ex.class_known.astype(np.float32)).to(device))              # [C]
        # the same for every stage: the thing each query's own patch belongs to (one_to_many), and
        # queries whose patch lies half in a thing
        own_thing = np.full(p, -1, np.int64)
        half_in = (ex.membership[:, things] == -1).any(1)
        if config.one_to_many and len(things):
            own = ex.membership[:, things] == 1
            has = own.any(1)
            own_thing[has] = own[has].argmax(1)
        for l in range(stages):
            aff = out.affinity[l][b, :, :p]
            inst_aff = aff[c:c + p]                                                     # [P, P]
            logits = out.class_logits[l][b, :p]                                        # [P, C + 1]
            qi, gi = hungarian_match(logits, inst_aff, member, gt_cls, config)
            assigned = own_thing.copy()
            assigned[qi] = gi
            sel = np.flatnonzero(assigned >= 0)
            cls_w = torch.ones(p, 1, device=device)
            if config.one_to_many and member.shape[1]:
                # a patch half in a thing is neither that thing nor "no object": no class loss
                cls_w[torch.from_numpy((assigned < 0) & half_in).to(device)] = 0.0
            target = torch.zeros_like(logits)
            target[:, c] = 1.0
            n = max(len(sel), 1)
            if len(sel):
                qt = torch.from_numpy(sel).to(device)
                gt = torch.from_numpy(assigned[sel]).to(device)
                target[qt, c] = 0.0
                target[qt, gt_cls[gt]] = 1.0
                rows = inst_aff[qt]                                                     # [M, P]
                col = member[:, gt].t()                                                  # [M, P]
                t, w = (col == 1).float(), (col >= 0).float()
                focal = (_focal(rows, t) * w).sum(-1) / w.sum(-1).clamp(min=1)
                dice = _dice(rows, t, w)
                lf, ld = focal.sum() / n, dice.sum() / n
            else:
                lf = ld = aff.new_zeros(())
            lc = (_focal(logits, target) * cls_w).sum() / n
            # Type-I queries: every class row; dice only where the class has members
            srows = aff[:c]
            sf = (_focal(srows, sem_t) * sem_w).sum(-1) / sem_w.sum(-1).clamp(min=1)
            sf = (sf * known).sum() / known.sum().clamp(min=1)
            sd = (_dice(srows, sem_t, sem_w) * present).sum() / present.sum().clamp(min=1)
            lp = (F.binary_cross_entropy_with_logits(out.presence_logits[l][b], present, reduction="none")
                  * known).sum() / known.sum().clamp(min=1)
            part = (config.class_weight * lc + config.focal_weight * (lf + sf) + config.dice_weight * (ld + sd)
                    + config.presence_weight * lp)
            loss = loss + part
            for k, v in (("class", lc), ("focal", lf), ("dice", ld), ("sem_focal", sf), ("sem_dice", sd),
                         ("presence", lp)):
                totals[k] += float(v.detach()) / stages
    nb = max(len(batch), 1)
    return loss / (nb * stages), {k: v / nb for k, v in totals.items()}


# ---------------------------------------------------------------- batches


def collate_examples(batch: Sequence[SamcpExample], device: torch.device) -> Tuple[torch.Tensor, List[torch.Tensor],
                                                                                     List[torch.Tensor]]:
    """Images padded (bottom/right) to one size in [0, 1], boxes and roi masks per image."""
    h = max(ex.image.shape[0] for ex in batch)
    w = max(ex.image.shape[1] for ex in batch)
    images = torch.zeros(len(batch), 3, h, w)
    for i, ex in enumerate(batch):
        im = torch.from_numpy(np.asarray(ex.image, dtype=np.float32)).permute(2, 0, 1) / 255.0  # a new, writable array
        images[i, :, : im.shape[1], : im.shape[2]] = im
    boxes = [torch.from_numpy(ex.boxes).to(device) for ex in batch]
    masks = [torch.from_numpy(ex.roi_masks).to(device) for ex in batch]
    return images.to(device), boxes, masks


# ---------------------------------------------------------------- trainer


@dataclass
class SamcpTrainResult:
    output: Path
    steps: int
    last_loss: float
    seconds: float
    log: Path
    steps_run: int = 0  # by this call (0: a resumed run that had already reached its steps)


# options a resumed run may change: how long it trains and how often it saves and logs; any other difference
# (the classes, the data, the patches, the recipe) means OUT.ckpt belongs to another run
RESUMABLE_OPTIONS = ("steps", "time_budget", "checkpoint_every", "log_every")
# options added after checkpoints recorded their run: left out of the record while off, so those checkpoints resume
LATER_OPTIONS = {"color_perm": 0.0}
# head options added after checkpoints recorded their run, likewise left out while off
LATER_HEAD_OPTIONS = {"texture_channels": 0}


class SamcpTrainer:
    """Trains a :class:`~samantic.heads.samcp.SamcpHead` on examples (:func:`load_examples`).

    Checkpoints (``OUT.ckpt``, head + optimizer + step + RNG) are written atomically every
    ``checkpoint_every`` steps and at the end; ``train(resume=True)`` continues from one.
    The log (``OUT.log.jsonl``) gets one line per ``log_every`` steps.
    """

    def __init__(self, head, config: SamcpTrainConfig, examples: Sequence[SamcpExample], device: str = "cpu",
                 metadata: Optional[Dict[str, Any]] = None) -> None:
        usable = [ex for ex in examples if ex.boxes.shape[0] > 0]
        if not usable:
            raise ValueError("no training image has any patch: nothing to learn from")
        self.head = head.to(device)
        self.config = config
        self.examples = list(usable)
        self.device = torch.device(device)
        self.metadata = dict(metadata or {})
        decay = [p for n, p in head.named_parameters() if p.ndim > 1 and "embed" not in n]
        rest = [p for n, p in head.named_parameters() if not (p.ndim > 1 and "embed" not in n)]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": rest, "weight_decay": 0.0}], lr=config.lr)
        self.step = 0
        self.elapsed = 0.0
        self._perms: Dict[int, List[int]] = {}

    def lr_at(self, step: int, elapsed: float = 0.0) -> float:
        from samantic.train.sam import warmup_cosine_lr

        return warmup_cosine_lr(self.config, step, elapsed)

    def batch_at(self, step: int) -> List[SamcpExample]:
        """The images of ``step``: epochs of seeded permutations, flips and patch drops seeded by step
        (so a resumed run sees exactly the batches an uninterrupted one would)."""
        n, k = len(self.examples), self.config.images_per_step
        idx = []
        for j in range(step * k, (step + 1) * k):
            epoch, pos = divmod(j, n)
            if epoch not in self._perms:
                perm = list(range(n))
                random.Random(self.config.seed * 1_000_003 + epoch).shuffle(perm)
                self._perms = {epoch: perm}
            idx.append(self._perms[epoch][pos])
        rng = random.Random(self.config.seed * 7_919 + step)
        batch = [self.examples[i].flipped() if rng.random() < self.config.flip_prob else self.examples[i] for i in idx]
        if self.config.crop_scale < 1:
            crop = np.random.default_rng([self.config.seed, step, 2])
            out = []
            for ex in batch:
                if crop.random() < 0.5:
                    h, w = ex.image.shape[:2]
                    f = crop.uniform(self.config.crop_scale, 1.0)
                    cw, ch = max(1, int(round(w * f))), max(1, int(round(h * f)))
                    x0, y0 = int(crop.integers(0, w - cw + 1)), int(crop.integers(0, h - ch + 1))
                    try:
                        ex = ex.cropped(x0, y0, x0 + cw, y0 + ch)
                    except ValueError:  # the window misses every patch: the image stays whole
                        pass
                out.append(ex)
            batch = out
        if self.config.color_perm > 0:
            orders = ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
            colour = np.random.default_rng([self.config.seed, step, 3])
            out = []
            for ex in batch:
                if colour.random() < self.config.color_perm:
                    order = list(orders[int(colour.integers(len(orders)))])
                    ex = replace(ex, image=np.ascontiguousarray(ex.image[..., order]))
                out.append(ex)
            batch = out
        if self.config.patch_drop > 0:
            drop = np.random.default_rng([self.config.seed, step])
            out = []
            for ex in batch:
                keep = drop.random(len(ex.boxes)) >= self.config.patch_drop
                keep[drop.integers(len(ex.boxes))] = True
                out.append(ex.subset(keep))
            batch = out
        return batch

    def train_step(self, batch: Sequence[SamcpExample]) -> Tuple[float, Dict[str, float]]:
        self.head.train()
        images, boxes, masks = collate_examples(batch, self.device)
        out = self.head(images, boxes, masks)
        loss, parts = samcp_losses(out, batch, self.config)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return loss.item(), parts

    def train(self, out: Path, resume: bool = False, progress: bool = True) -> SamcpTrainResult:
        from samantic.heads.samcp import save_samcp

        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        ckpt, log = out.with_suffix(out.suffix + ".ckpt"), out.with_suffix(out.suffix + ".log.jsonl")
        if resume and ckpt.is_file():
            self.load_state(ckpt)
            if log.is_file():  # lines past the checkpoint are done again: keep the log one line per step
                kept = [l for l in log.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= self.step]
                log.write_text("".join(l + "\n" for l in kept))
        elif log.exists():  # a fresh start (nothing to resume from): a fresh log
            log.unlink()
        start, last = time.perf_counter() - self.elapsed, float("nan")
        first = self.step
        with _progress(progress, self.config.steps, self.step) as advance, open(log, "a") as logf, \
                _save_on_interrupt(self, ckpt):
            window: List[float] = []
            while self.step < self.config.steps:
                elapsed = time.perf_counter() - start
                if self.config.time_budget > 0 and elapsed >= self.config.time_budget:
                    break
                for g in self.optimizer.param_groups:
                    g["lr"] = self.lr_at(self.step, elapsed)
                with HeldSignals("SIGINT", "SIGTERM"):  # a step is done whole or not at all: the checkpoint stays whole
                    last, parts = self.train_step(self.batch_at(self.step))
                    self.step += 1
                window.append(last)
                self.elapsed = time.perf_counter() - start
                advance(last)
                if self.step % self.config.log_every == 0:
                    logf.write(json.dumps({"step": self.step, "loss": float(np.mean(window)),
                                           "lr": self.optimizer.param_groups[0]["lr"], "seconds": self.elapsed,
                                           **parts}) + "\n")
                    logf.flush()
                    window = []
                if self.step % self.config.checkpoint_every == 0:
                    self.save_state(ckpt)
        self.elapsed = time.perf_counter() - start
        self.save_state(ckpt)
        meta = {**self.metadata, "steps_done": str(self.step),
                "train_config": json.dumps(asdict(self.config), sort_keys=True)}
        save_samcp(self.head.eval(), out, metadata=meta)
        return SamcpTrainResult(out, self.step, last, self.elapsed, log, steps_run=self.step - first)

    def run_record(self) -> Dict[str, Any]:
        """What a checkpoint must share with the run that resumes from it."""
        return json.loads(json.dumps({
            "names": list(self.head.info.names),
            "head": {k: v for k, v in asdict(self.head.info).items()
                     if k not in ("classes", "stuff", "extra") and not (k in LATER_HEAD_OPTIONS and v == LATER_HEAD_OPTIONS[k])},
            "data": self.metadata.get("data"), "patches": self.metadata.get("patches"),
            "init": self.metadata.get("init"),
            **({"init_weights": self.metadata["init_weights"]} if "init_weights" in self.metadata else {}),
            "config": {k: v for k, v in asdict(self.config).items()
                       if k not in RESUMABLE_OPTIONS and not (k in LATER_OPTIONS and v == LATER_OPTIONS[k])}},
            default=str))

    def save_state(self, path: Path) -> None:
        import io

        from samantic.io import atomic_write_bytes

        buf = io.BytesIO()
        torch.save({"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                    "elapsed": self.elapsed, "torch_rng": torch.get_rng_state(),
                    "run": json.dumps(self.run_record())}, buf)
        atomic_write_bytes(path, buf.getvalue())

    def load_state(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged or foreign checkpoint names its file
            raise ValueError(f"{path}: cannot resume from this checkpoint ({e})") from None
        if not isinstance(state, dict) or not {"head", "optimizer", "step", "torch_rng"} <= set(state):
            raise ValueError(f"{path}: cannot resume from this checkpoint (not a samcp training checkpoint)")
        if "run" in state:  # checkpoints before 2026-12-03 do not record their run
            # compared before the weights are loaded: another run's options are named, not its tensor shapes
            try:
                theirs = json.loads(state["run"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: cannot resume from this checkpoint (its run record is damaged: {e})") from None
            ours = self.run_record()
            from samantic.io.writers import record_diffs

            diffs = record_diffs(theirs, ours)
            if diffs:
                raise ValueError(f"{path} is the checkpoint of another run ({'; '.join(diffs[:6])}): resume with the "
                                 "options it was started with, or train into another --out (or delete the checkpoint)")
        try:
            self.head.load_state_dict(state["head"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = int(state["step"])
            self.elapsed = float(state.get("elapsed", 0.0))
            torch.set_rng_state(state["torch_rng"])
        except Exception as e:  # noqa: BLE001 - a damaged or foreign checkpoint names its file
            raise ValueError(f"{path}: cannot resume from this checkpoint ({e})") from None


# ---------------------------------------------------------------- staged training

# what a `--stage` may set, and its type; the other options hold for the whole run
STAGE_KEYS = {"steps": int, "minutes": float, "lr": float, "color_perm": float, "texture_channels": int}


def parse_stages(specs: Sequence[str], first: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The stages of a staged training from ``--stage KEY=VALUE,...`` options, in order.

    Each stage is a full dict over :data:`STAGE_KEYS`: the keys a spec leaves out are carried
    from the stage before, the first stage's from ``first`` (the command's own options).
    Texture statistics may be switched on once, from 0 (their modules start at zero output,
    so the head starts as the stage before left it), never changed or taken away.

    Raises:
        ValueError: naming the stage, its spec and what is wrong with it.
    """
    missing = set(STAGE_KEYS) - set(first)
    if missing:
        raise ValueError(f"first stage defaults lack {sorted(missing)}")
    if not specs:
        raise ValueError("a staged training needs at least one --stage")
    stages: List[Dict[str, Any]] = []
    prev = {k: STAGE_KEYS[k](first[k]) for k in STAGE_KEYS}
    for i, spec in enumerate(specs, 1):
        where = f"--stage {i} ({spec!r})"
        cur = dict(prev)
        for item in (x.strip() for x in spec.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in STAGE_KEYS:
                raise ValueError(f"{where}: {item!r} is not KEY=VALUE with KEY one of {', '.join(STAGE_KEYS)}")
            kind = STAGE_KEYS[key]
            try:
                cur[key] = kind(value.strip())
            except ValueError:
                raise ValueError(f"{where}: {key} must be {'an integer' if kind is int else 'a number'}, "
                                 f"got {value.strip()!r}") from None
        if cur["steps"] < 1:
            raise ValueError(f"{where}: steps must be >= 1, got {cur['steps']}")
        for key in ("minutes", "lr", "texture_channels"):
            if not cur[key] >= 0 or cur[key] == float("inf"):
                raise ValueError(f"{where}: {key} must be a finite number >= 0, got {cur[key]}")
        if not 0.0 <= cur["color_perm"] <= 1.0:  # NaN fails too
            raise ValueError(f"{where}: color_perm must be in [0, 1], got {cur['color_perm']}")
        if i > 1 and cur["texture_channels"] != prev["texture_channels"] and prev["texture_channels"]:
            raise ValueError(f"{where}: texture_channels {prev['texture_channels']} -> {cur['texture_channels']}: "
                             "texture statistics may be switched on once (from 0), not changed or taken away")
        stages.append(cur)
        prev = cur
    return stages


def stage_output(out: Path, index: int, count: int) -> Path:
    """Where stage ``index`` (from 1) of ``count`` writes its head: OUT for the last, OUT's stem
    ``.stageN`` beside it for the others (each with its own .ckpt and .log.jsonl)."""
    out = Path(out)
    return out if index == count else out.with_name(f"{out.stem}.stage{index}{out.suffix}")


def train_stages(head, config: SamcpTrainConfig, examples: Sequence[SamcpExample], stages: Sequence[Dict[str, Any]],
                 out: Path, *, seed: int = 0, text_embeddings: Optional[torch.Tensor] = None, device: str = "cpu",
                 metadata: Optional[Dict[str, Any]] = None, resume: bool = False, progress: bool = True,
                 on_stage=None) -> List[SamcpTrainResult]:
    """Trains ``head`` through ``stages`` (:func:`parse_stages`) in turn, on one load of ``examples``.

    Stage ``i`` trains into :func:`stage_output` with ``config`` under the stage's steps, time
    budget (minutes), learning rate and colour permutations; each stage after the first starts,
    like ``samantic train samcp --init``, from the file the stage before saved, with a fresh
    optimizer and learning-rate schedule (warm-up, then decay) and the torch RNG seeded anew
    from ``seed``: the same weights as separate commands chained by ``--init`` (a test holds
    it), without loading the patches again for each. ``head`` must have the first stage's
    ``texture_channels``; a stage that switches them on gets a head with them.

    With more than one stage, each stage's file records the recipe (``stages``), its place
    (``stage``: "i/n") and, after the first, the stage it started from (``init_weights``: the
    digest of its weights, :func:`~samantic.models.weights.state_sha256`, also in the run record
    that ``--resume`` checks; ``init_file``).

    ``resume=True`` resumes every stage from its checkpoint: a finished stage trains no step and
    saves the same weights again, so the next one resumes from the same start. ``on_stage(i, trainer)``
    is called before each stage trains (a caller's handle on the running trainer).

    Returns:
        One :class:`SamcpTrainResult` per stage.
    """
    from samantic.heads.samcp import SamcpHead
    from samantic.models.weights import state_sha256

    if head.info.texture_channels != stages[0]["texture_channels"]:
        raise ValueError(f"the head has texture_channels {head.info.texture_channels}, the first stage "
                         f"{stages[0]['texture_channels']}")
    record = json.dumps([dict(s) for s in stages])
    results: List[SamcpTrainResult] = []
    for i, stage in enumerate(stages, 1):
        meta = dict(metadata or {})
        if len(stages) > 1:  # the recipe goes into every stage's file
            meta.update({"stages": record, "stage": f"{i}/{len(stages)}"})
        if i > 1:
            prev, digest = results[-1].output, state_sha256(head)  # `head`: the stage before's, as it saved it
            torch.manual_seed(seed)  # as the separate command would start: seeded, then the head built
            head = SamcpHead(replace(head.info, texture_channels=stage["texture_channels"]),
                             text_embeddings=text_embeddings)
            init_from_head(head, prev)
            # the stage before's weights, by digest rather than its file's (`init` of --init): a resumed stage saves
            # the same weights again, but safetensors writes the header's entries in no fixed order
            meta.update({"init_weights": digest, "init_file": str(prev)})
        cfg = replace(config, steps=stage["steps"], time_budget=stage["minutes"] * 60, lr=stage["lr"],
                      color_perm=stage["color_perm"])
        trainer = SamcpTrainer(head, cfg, examples, device=device, metadata=meta)
        if on_stage is not None:
            on_stage(i, trainer)
        try:
            results.append(trainer.train(stage_output(out, i, len(stages)), resume=resume, progress=progress))
        except ValueError as e:  # e.g. a checkpoint of another recipe: say which stage
            if len(stages) > 1:
                raise ValueError(f"stage {i}/{len(stages)}: {e}") from None
            raise
        del trainer  # its optimizer state: the next stage starts a fresh one
    return results


class _save_on_interrupt:
    """Ctrl-C (or SIGTERM, which the CLI turns into it) during training saves the checkpoint before the
    interrupt goes on, so ``--resume`` continues from the last finished step."""

    def __init__(self, trainer: "SamcpTrainer", ckpt: Path) -> None:
        self.trainer, self.ckpt = trainer, ckpt

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc) -> bool:
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            self.trainer.save_state(self.ckpt)
        return False


class _progress:
    """A rich progress bar on stderr (only on a terminal) that shows the loss."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled, self.total, self.done = enabled and sys.stderr.isatty(), total, done

    def __enter__(self):
        if not self.enabled:
            return lambda loss: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("samcp"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(),
                            console=Console(stderr=True))
        self.bar.__enter__()
        task = self.bar.add_task("samcp", total=self.total, completed=self.done, loss=float("nan"))
        return lambda loss: self.bar.update(task, advance=1, loss=loss)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)
