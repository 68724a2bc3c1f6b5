"""Panoptic quality against torchmetrics and a mask-by-mask reference; semantic mIoU against numpy.

How torchmetrics' ``PanopticQuality`` (1.x) maps onto panopticapi, and where the two differ:

* Inputs are ``[B, H, W, 2]`` of ``(category_id, instance_id)``; a segment is one such pair
  per image. Here a segment ``s`` becomes ``(category of s, s)`` and void (id 0) becomes
  category 0, which is in neither ``things`` nor ``stuffs``: torchmetrics maps unknown
  target categories to its void colour, and unknown predicted ones too with
  ``allow_unknown_preds_category=True``.
* Stuff: torchmetrics zeroes the instance id of stuff pixels, so all segments of one stuff
  category in an image become one segment; panopticapi keeps them apart. The two agree
  when each image has at most one segment per stuff category, in prediction and ground
  truth (the shapes world v2 ground truth always does).
* Void in the prediction: torchmetrics also takes ground-truth pixels predicted as void out
  of the union, and does not count a ground-truth segment that is more than half predicted
  void as a false negative; panopticapi does neither (a void prediction is just a miss).
  The two agree when predicted void lies only on ground-truth void.
* Crowd: torchmetrics has no ``iscrowd``; crowd cases are checked against the reference only.
* Numbers: torchmetrics divides int64 tensors, so each IoU is float32; tp / fp / fn agree
  exactly, PQ / SQ / RQ to float32 precision. Both average over categories with
  ``tp + fp + fn > 0``; torchmetrics gives no things / stuff split, so that is rebuilt from
  its per-class output and counts.
"""

import math

import numpy as np
import pytest
import torch
from torchmetrics.detection import PanopticQuality as TorchPQ

from samantic.train.data.panoptic import CATEGORIES, render_panoptic
from samantic.train.panoptic_metrics import PanopticQuality, SemanticConfusion

THINGS = [c["id"] for c in CATEGORIES if c["isthing"]]
STUFF = [c["id"] for c in CATEGORIES if not c["isthing"]]
SMALL = [  # hand-computed cases: things a and b, stuff s
    {"id": 1, "name": "a", "isthing": 1},
    {"id": 2, "name": "b", "isthing": 1},
    {"id": 7, "name": "s", "isthing": 0},
]


def segs(table):
    return [{"id": i, "category_id": c} for i, c in table.items()]


def present(pan, table):
    """The segments of ``table`` that still have pixels in ``pan``."""
    ids = set(np.unique(pan).tolist())
    return {i: c for i, c in table.items() if i in ids}


# ---------------------------------------------------------------------------
# independent references


def torchmetrics_pq(images, categories=CATEGORIES):
    """torchmetrics on ``(pred, pred_table, gt, gt_table)`` images: per-class (pq, sq, rq) and (tp, fp, fn) by id."""
    things = {c["id"] for c in categories if c["isthing"]}
    stuffs = {c["id"] for c in categories if not c["isthing"]}
    metric = TorchPQ(things=things, stuffs=stuffs, allow_unknown_preds_category=True,
                     return_per_class=True, return_sq_and_rq=True)

    def colours(pan, table):
        ids, inverse = np.unique(pan, return_inverse=True)
        category = np.array([table.get(int(i), 0) for i in ids], np.int64)[inverse.reshape(pan.shape)]
        return torch.from_numpy(np.stack([category, pan.astype(np.int64)], -1))[None]

    for pred, pred_table, gt, gt_table in images:
        metric.update(colours(pred, pred_table), colours(gt, gt_table))
    per_class = metric.compute().numpy()  # [C, 3]: pq, sq, rq
    index = metric.cat_id_to_continuous_id
    counts = torch.stack([metric.true_positives, metric.false_positives, metric.false_negatives], 1).numpy()
    return {cid: (per_class[k], counts[k]) for cid, k in index.items()}


def reference_pq(images, categories):
    """panopticapi's rule, written with one boolean mask per segment: {category id: [iou sum, tp, fp, fn]}."""
    stats = {c["id"]: [0.0, 0, 0, 0] for c in categories}
    for pred, pred_segs, gt, gt_segs in images:
        gt_void = gt == 0
        matched_gt, matched_pred = set(), set()
        for g in gt_segs:
            if g.get("iscrowd", 0):
                continue
            gm = gt == g["id"]
            for p in pred_segs:
                pm = pred == p["id"]
                if p["category_id"] != g["category_id"]:
                    continue
                inter = np.sum(gm & pm)
                iou = inter / np.sum((gm | pm) & ~(pm & gt_void))
                if iou > 0.5:
                    stats[g["category_id"]][0] += iou
                    stats[g["category_id"]][1] += 1
                    matched_gt.add(g["id"])
                    matched_pred.add(p["id"])
        for g in gt_segs:
            if not g.get("iscrowd", 0) and g["id"] not in matched_gt:
                stats[g["category_id"]][3] += 1
        for p in pred_segs:
            if p["id"] in matched_pred:
                continue
            pm = pred == p["id"]
            crowd = np.zeros_like(pm)
            for g in gt_segs:
                if g.get("iscrowd", 0) and g["category_id"] == p["category_id"]:
                    crowd |= gt == g["id"]
            if np.sum(pm & (gt_void | crowd)) / np.sum(pm) <= 0.5:
                stats[p["category_id"]][2] += 1
    return stats


def assert_matches_torchmetrics(images, categories=CATEGORIES):
    ours = PanopticQuality(categories)
    for image in images:
        pred, pred_table, gt, gt_table = image
        ours.update(pred, segs(pred_table), gt, segs(gt_table))
    result = ours.compute()
    theirs = torchmetrics_pq(images, categories)
    used = {"all": [], "things": [], "stuff": []}
    for c in categories:
        (pq, sq, rq), counts = theirs[c["id"]]
        mine = result["per_class"][c["name"]]
        assert [mine["tp"], mine["fp"], mine["fn"]] == counts.tolist(), c["name"]
        np.testing.assert_allclose([mine["pq"], mine["sq"], mine["rq"]], [pq, sq, rq], rtol=1e-6, atol=1e-7)
        if counts.sum():
            for key in ("all", "things" if c["isthing"] else "stuff"):
                used[key].append((pq, sq, rq))
    for key, rows in used.items():
        assert result[key]["n"] == len(rows)
        if rows:
            mean = np.mean(rows, axis=0)
            np.testing.assert_allclose([result[key][m] for m in ("pq", "sq", "rq")], mean, rtol=1e-6, atol=1e-7)
        else:
            assert math.isnan(result[key]["pq"])
    return result


def assert_matches_reference(images, categories):
    ours = PanopticQuality(categories)
    for pred, pred_segs, gt, gt_segs in images:
        ours.update(pred, pred_segs, gt, gt_segs)
    result = ours.compute()["per_class"]
    for c in categories:
        iou, tp, fp, fn = reference_pq(images, categories)[c["id"]]
        mine = result[c["name"]]
        assert (mine["tp"], mine["fp"], mine["fn"]) == (tp, fp, fn), c["name"]
        assert mine["sq"] == pytest.approx(iou / tp if tp else 0.0, abs=1e-12)


# ---------------------------------------------------------------------------
# perturbations: ground truth -> prediction


def _neighbour(pan, mask):
    """The id that borders ``mask`` most (its own id when nothing else touches it)."""
    grown = np.zeros_like(mask)
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    ring = pan[grown & ~mask]
    ring = ring[ring != 0]
    return int(np.bincount(ring).argmax()) if ring.size else int(pan[mask][0])


def perturb(rng, gt, gt_table, n_ops=3):
    """A prediction made from the ground truth: drop, merge, split, shift, relabel (stuff stays one per category)."""
    pred, table = gt.copy(), dict(gt_table)
    next_id = max(table) + 1
    for op in rng.choice(["drop", "merge", "split", "shift", "relabel", "renumber"], n_ops):
        things = sorted(i for i, c in present(pred, table).items() if c in THINGS)
        if not things:
            break
        s = int(rng.choice(things))
        mask = pred == s
        if op == "drop":  # swallowed by its neighbour
            pred[mask] = _neighbour(pred, mask)
        elif op == "merge":  # with its neighbour, under its own id and category
            other = _neighbour(pred, mask)
            if other != s and table[other] in THINGS:
                pred[pred == other] = s
        elif op == "split":  # the part right of the centroid becomes a new segment
            ys, xs = np.nonzero(mask)
            right = mask & (np.arange(gt.shape[1])[None] > xs.mean() + rng.normal(0, 2))
            pred[right] = next_id
            table[next_id] = table[s]
            next_id += 1
        elif op == "shift":
            dy, dx = rng.integers(-4, 5, 2)
            moved = np.roll(mask, (int(dy), int(dx)), axis=(0, 1))
            pred[mask & ~moved] = _neighbour(pred, mask)
            pred[moved] = s
        elif op == "relabel":
            table[s] = int(rng.choice(THINGS))
        elif op == "renumber":  # ids are arbitrary; only pixels and categories count
            pred[mask] = next_id
            table[next_id] = table.pop(s)
            next_id += 1
    return pred, present(pred, table)


def add_gt_void(rng, gt, gt_table, pred):
    """Void in the ground truth (a rectangle), and void in the prediction only inside it."""
    h, w = gt.shape
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    box = np.zeros_like(gt, bool)
    box[y : y + rng.integers(4, h // 2), x : x + rng.integers(4, w // 2)] = True
    gt = np.where(box, 0, gt)
    inner = box & (rng.random(gt.shape) < 0.3)
    return np.where(inner, 0, pred), gt, present(gt, gt_table)


def scene_case(seed, rng, void):
    scene = render_panoptic(seed, size=(96, 128))
    gt, gt_table = scene.panoptic.astype(np.int64), dict(scene.segments)
    pred, pred_table = perturb(rng, gt, gt_table, n_ops=int(rng.integers(0, 5)))
    if void:
        pred, gt, gt_table = add_gt_void(rng, gt, gt_table, pred)
        pred_table = present(pred, pred_table)
    return pred, pred_table, gt, gt_table


def random_case(rng, h=24, w=32):
    """Voronoi segments with random categories, one segment per stuff category; a perturbed copy as prediction."""
    n = int(rng.integers(2, 9))
    centres = rng.uniform((0, 0), (h, w), (n, 2))
    yy, xx = np.mgrid[:h, :w]
    gt = 1 + np.argmin((yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2, -1)
    stuff = list(rng.permutation(STUFF))
    table = {}
    for i in range(1, n + 1):
        table[i] = int(stuff.pop()) if stuff and rng.random() < 0.3 else int(rng.choice(THINGS))
    table = present(gt, table)
    pred, pred_table = perturb(rng, gt, table, n_ops=int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        pred, gt, table = add_gt_void(rng, gt, table, pred)
        pred_table = present(pred, pred_table)
    return pred, pred_table, gt, table


# ---------------------------------------------------------------------------
# against torchmetrics, where the conventions agree


@pytest.mark.parametrize("seed", range(6))
def test_random_cases_match_torchmetrics(seed):
    rng = np.random.default_rng(seed)
    images = [random_case(rng) for _ in range(8)]
    assert_matches_torchmetrics(images)


@pytest.mark.parametrize("void", [False, True])
def test_perturbed_shapes_v2_scenes_match_torchmetrics(void):
    rng = np.random.default_rng(7 + void)
    images = [scene_case(seed, rng, void) for seed in range(10)]
    result = assert_matches_torchmetrics(images)
    # the cases are not trivial: some segments match, others do not
    counts = np.array([[v["tp"], v["fp"], v["fn"]] for v in result["per_class"].values()]).sum(0)
    assert counts[0] > 20 and counts[1] > 0 and counts[2] > 0
    assert 0.3 < result["all"]["pq"] < 1.0 and result["things"]["n"] > 0 and result["stuff"]["n"] > 0


def test_each_perturbation_alone_matches_torchmetrics():
    scene = render_panoptic(3, size=(96, 128))
    gt, table = scene.panoptic.astype(np.int64), dict(scene.segments)
    for k in range(12):
        rng = np.random.default_rng(100 + k)
        pred, pred_table = perturb(rng, gt, table, n_ops=1)
        assert_matches_torchmetrics([(pred, pred_table, gt, table)])


def test_ground_truth_as_prediction_is_perfect_in_both():
    scenes = [render_panoptic(seed, size=(96, 128)) for seed in range(3)]
    images = [(s.panoptic, dict(s.segments), s.panoptic, dict(s.segments)) for s in scenes]
    result = assert_matches_torchmetrics(images)
    assert result["all"]["pq"] == result["things"]["pq"] == result["stuff"]["pq"] == 1.0


# ---------------------------------------------------------------------------
# against the mask-by-mask reference, cases torchmetrics treats otherwise


@pytest.mark.parametrize("seed", range(4))
def test_random_cases_with_void_predictions_crowd_and_split_stuff_match_the_reference(seed):
    rng = np.random.default_rng(50 + seed)
    images = []
    for _ in range(6):
        pred, pred_table, gt, gt_table = random_case(rng)
        # void predicted on labelled pixels, a stuff segment cut in two, a crowd region
        pred = np.where(rng.random(pred.shape) < 0.1, 0, pred)
        stuff = [i for i, c in pred_table.items() if c in STUFF]
        if stuff:
            new = max(pred_table) + 1
            pred = np.where((pred == stuff[0]) & (np.arange(pred.shape[1])[None] % 7 < 3), new, pred)
            pred_table[new] = pred_table[stuff[0]]
        pred_segs = segs(present(pred, pred_table))
        gt_segs = [{"id": i, "category_id": c, "iscrowd": int(c in THINGS and rng.random() < 0.2)}
                   for i, c in gt_table.items()]
        images.append((pred, pred_segs, gt, gt_segs))
    assert_matches_reference(images, CATEGORIES)


# ---------------------------------------------------------------------------
# hand-computed cases (SMALL: things a=1, b=2, stuff s=7)


def _pq(pred, pred_table, gt, gt_table, categories=SMALL):
    metric = PanopticQuality(categories)
    metric.update(np.array(pred), segs(pred_table), np.array(gt), segs(gt_table))
    return metric.compute()


GT = [[1, 1, 7, 7],
      [1, 1, 7, 7],
      [1, 1, 7, 7],
      [1, 1, 7, 7]]  # thing 1 (a) on the left, stuff 7 (s) on the right
GT_TABLE = {1: 1, 7: 7}


def test_perfect_prediction_has_pq_one_whatever_the_ids():
    pred = np.array(GT) * 3 + 10  # other ids, the same segments
    result = _pq(pred, {13: 1, 31: 7}, GT, GT_TABLE)
    assert result["all"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    assert result["things"]["n"] == result["stuff"]["n"] == 1
    none = {"missed": 0, "misnamed": 0, "spurious": 0}
    assert result["per_class"]["a"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "tp": 1, "fp": 0, "fn": 0, **none}
    assert result["per_class"]["b"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 0, **none}
    assert result["confusion"] == {"names": ["a", "b", "s"], "matrix": [[1, 0, 0], [0, 0, 0], [0, 0, 1]]}


def test_errors_split_into_misnamed_missed_and_spurious():
    gt = [[1, 1, 2, 2, 7, 7],
          [1, 1, 2, 2, 7, 7],
          [3, 3, 0, 0, 7, 7]]  # things: 1 (a), 2 (b), 3 (a); stuff 7 (s); two void pixels
    gt_table = {1: 1, 2: 1, 3: 1, 7: 7}
    pred = [[5, 5, 6, 6, 7, 7],
            [5, 5, 6, 6, 7, 7],
            [8, 8, 9, 9, 7, 7]]  # 5 names segment 1 right, 6 calls segment 2 (an a) b, 8 cuts segment 3 in half,
    #                              9 lies on void only, 7 is the stuff
    pred[2][1] = 4  # the other half of segment 3: a b that covers nothing at IoU > 0.5
    result = _pq(pred, {5: 1, 6: 2, 8: 1, 4: 2, 9: 2, 7: 7}, gt, gt_table)
    a, b, st = (result["per_class"][k] for k in ("a", "b", "s"))
    assert (a["tp"], a["fn"], a["misnamed"], a["missed"]) == (1, 2, 1, 1)  # 2 misnamed as b, 3 missed (IoU 1/2)
    assert (a["fp"], a["spurious"]) == (1, 1)  # 8: half of segment 3, no pair above 0.5
    assert (b["tp"], b["fn"], b["fp"], b["spurious"]) == (0, 0, 2, 1)  # 6 names an a; 4 spurious; 9 on void: ignored
    assert (st["tp"], st["fp"], st["fn"]) == (1, 0, 0)
    assert result["confusion"]["matrix"] == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
    # the breakdown never changes PQ itself: the same counts as without it
    assert a["pq"] == pytest.approx(1.0 * 1 / (1 + 0.5 * 1 + 0.5 * 2))


def test_one_false_positive():
    pred = np.array(GT)
    pred[0, 3] = 5  # one stuff pixel predicted as an extra thing a
    result = _pq(pred, {1: 1, 7: 7, 5: 1}, GT, GT_TABLE)
    a, s = result["per_class"]["a"], result["per_class"]["s"]
    assert (a["tp"], a["fp"], a["fn"]) == (1, 1, 0)
    assert a["sq"] == 1.0 and a["rq"] == pytest.approx(2 / 3) and a["pq"] == pytest.approx(2 / 3)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 0) and s["pq"] == pytest.approx(7 / 8)
    assert result["all"]["pq"] == pytest.approx((2 / 3 + 7 / 8) / 2)
    assert result["things"]["pq"] == pytest.approx(2 / 3) and result["stuff"]["pq"] == pytest.approx(7 / 8)


@pytest.mark.parametrize("covered, matched", [(4, False), (5, True)])
def test_iou_of_exactly_one_half_is_no_match(covered, matched):
    pred = np.full((4, 4), 7)
    pred.flat[[0, 1, 4, 5, 8, 9, 12, 13][:covered]] = 1  # the first `covered` of thing 1's 8 pixels
    a = _pq(pred, {1: 1, 7: 7}, GT, GT_TABLE)["per_class"]["a"]
    if matched:  # IoU 5/8
        assert (a["tp"], a["fp"], a["fn"]) == (1, 0, 0) and a["pq"] == pytest.approx(5 / 8)
    else:  # IoU 4/8: a false positive and a false negative
        assert (a["tp"], a["fp"], a["fn"]) == (0, 1, 1) and a["pq"] == 0.0


def test_prediction_on_ground_truth_void_leaves_the_union():
    gt = np.array(GT)
    gt[:, 2] = 0  # a void column beside the thing
    pred = np.array(GT)
    pred[:, 2] = 1  # the thing predicted over the void too: 12 pixels, 4 of them on void
    result = _pq(pred, {1: 1, 7: 7}, gt, GT_TABLE)
    assert result["per_class"]["a"]["sq"] == 1.0  # 8 / (12 + 8 - 8 - 4), not 8 / 12
    assert result["per_class"]["s"]["sq"] == 1.0


@pytest.mark.parametrize(
    "pixels, is_fp",
    [
        ([(0, 2), (0, 3), (1, 2), (2, 2)], False),  # 3 of 4 pixels on void
        ([(0, 2), (0, 3), (2, 2), (3, 2)], True),  # 2 of 4: exactly half is not more than half
    ],
)
def test_unmatched_prediction_mostly_on_void_is_no_false_positive(pixels, is_fp):
    gt = np.array(GT)
    gt[:2, 2:] = 0  # 4 void pixels at the top right
    pred = np.array(GT)
    for y, x in pixels:
        pred[y, x] = 9
    result = _pq(pred, {1: 1, 7: 7, 9: 2}, gt, GT_TABLE)
    assert result["per_class"]["b"]["fp"] == int(is_fp)


def test_crowd_is_never_matched_and_excuses_its_own_category_only():
    gt = np.array(GT)
    gt[:, 3] = 8  # a crowd region of thing a in the right column
    gt_segs = [{"id": 1, "category_id": 1}, {"id": 7, "category_id": 7}, {"id": 8, "category_id": 1, "iscrowd": 1}]
    pred = np.array(gt)
    pred[:, 3] = 9
    for cat, fp in ((1, 0), (2, 1)):  # an a on the a-crowd is ignored, a b there is a false positive
        metric = PanopticQuality(SMALL)
        metric.update(pred, segs({1: 1, 7: 7, 9: cat}), gt, gt_segs)
        result = metric.compute()["per_class"]
        assert result["a"]["tp"] == 1 and result["a"]["fn"] == 0, "the crowd segment is no false negative"
        assert result["a" if cat == 1 else "b"]["fp"] == fp


def test_void_prediction_is_a_miss_here_but_not_in_torchmetrics():
    pred = np.array(GT)
    pred[:3, :2] = 0  # 6 of thing 1's 8 pixels predicted void, 2 still predicted as thing 1
    ours = _pq(pred, {1: 1, 7: 7}, GT, GT_TABLE)["per_class"]["a"]
    assert (ours["tp"], ours["fp"], ours["fn"]) == (0, 1, 1)  # IoU 2 / 8: panopticapi keeps void in the union
    (pq, _, _), counts = torchmetrics_pq([(pred, {1: 1, 7: 7}, np.array(GT), GT_TABLE)], SMALL)[1]
    assert counts.tolist() == [1, 0, 0] and pq == pytest.approx(1.0)  # torchmetrics: 2 / (2 + 8 - 6 - 2)


def test_split_stuff_is_two_segments_here_but_one_in_torchmetrics():
    pred = np.array(GT)
    pred[:, 3] = 8
    pred[3, 2] = 8  # stuff s as two segments: 7 (3 pixels) and 8 (5 pixels)
    table = {1: 1, 7: 7, 8: 7}
    s = _pq(pred, table, GT, GT_TABLE)["per_class"]["s"]
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)  # 8 matches at IoU 5/8, 7 is a false positive
    assert s["pq"] == pytest.approx((5 / 8) / 1.5)
    (pq, _, _), counts = torchmetrics_pq([(pred, table, np.array(GT), GT_TABLE)], SMALL)[7]
    assert counts.tolist() == [1, 0, 0] and pq == 1.0


def test_averages_skip_absent_categories_and_accumulate_over_images():
    metric = PanopticQuality(SMALL)
    things_only = np.array([[1, 1], [2, 2]])
    metric.update(things_only, segs({1: 1, 2: 2}), things_only, segs({1: 1, 2: 2}))
    result = metric.compute()
    assert result["all"]["n"] == 2 and result["things"]["pq"] == 1.0
    assert result["stuff"]["n"] == 0 and math.isnan(result["stuff"]["pq"])
    metric.update(things_only, segs({1: 1, 2: 1}), things_only, segs({1: 1, 2: 2}))  # b read as a
    result = metric.compute()["per_class"]
    assert (result["a"]["tp"], result["a"]["fp"], result["b"]["tp"], result["b"]["fn"]) == (2, 1, 1, 1)
    assert metric.images == 2
    metric.reset()
    assert metric.compute()["all"]["n"] == 0


def test_bootstrap_resamples_images_and_brackets_the_estimate():
    metric = PanopticQuality(SMALL)
    with pytest.raises(ValueError, match="at least one image"):
        metric.bootstrap()
    perfect = np.array([[1, 1], [2, 2]])
    metric.update(perfect, segs({1: 1, 2: 2}), perfect, segs({1: 1, 2: 2}))
    # one image (or copies of one): every resample is that image, the interval is the point
    assert metric.bootstrap(samples=50)["things"] == (1.0, 1.0)
    assert all(math.isnan(v) for v in metric.bootstrap(samples=50)["stuff"])
    metric.update(perfect, segs({1: 1, 2: 1}), perfect, segs({1: 1, 2: 2}))  # b read as a
    point = metric.compute()["all"]["pq"]
    lo, hi = metric.bootstrap(samples=400, seed=1)["all"]
    assert lo < point < hi and lo >= 0.0 and hi == 1.0  # the resample of the perfect image twice
    # the same resamples by hand: PQ of the summed counts of the drawn images
    draws = np.random.default_rng(1).integers(0, 2, size=(400, 2))
    by_hand = []
    for d in draws:
        m = PanopticQuality(SMALL)
        for i in d:
            if i == 0:
                m.update(perfect, segs({1: 1, 2: 2}), perfect, segs({1: 1, 2: 2}))
            else:
                m.update(perfect, segs({1: 1, 2: 1}), perfect, segs({1: 1, 2: 2}))
        by_hand.append(m.compute()["all"]["pq"])
    assert (lo, hi) == tuple(np.percentile(by_hand, [2.5, 97.5]))
    metric.reset()
    with pytest.raises(ValueError):
        metric.bootstrap()


def test_invalid_input_raises_value_error():
    metric = PanopticQuality(SMALL)
    gt = np.array(GT)
    ok = segs(GT_TABLE)
    with pytest.raises(ValueError, match="same shape"):
        metric.update(gt[:, :3], ok, gt, ok)
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        metric.update(gt[None], ok, gt[None], ok)
    with pytest.raises(ValueError, match="missing from pred_segments"):
        metric.update(gt, segs({1: 1}), gt, ok)
    with pytest.raises(ValueError, match="missing from gt_segments"):
        metric.update(gt, ok, gt, segs({7: 7}))
    with pytest.raises(ValueError, match="unknown category_id 3"):
        metric.update(gt, segs({1: 3, 7: 7}), gt, ok)
    with pytest.raises(ValueError, match="no pixels"):
        metric.update(gt, segs({1: 1, 7: 7, 9: 2}), gt, ok)
    with pytest.raises(ValueError, match="twice"):
        metric.update(gt, ok + ok[:1], gt, ok)
    with pytest.raises(ValueError, match="integer"):
        metric.update(gt.astype(float), ok, gt, ok)
    with pytest.raises(ValueError, match="negative"):
        metric.update(-gt, ok, gt, ok)
    assert metric.images == 0, "a rejected image adds nothing"
    with pytest.raises(ValueError, match="isthing"):
        PanopticQuality([{"id": 1, "name": "a"}])
    with pytest.raises(ValueError, match="unique"):
        PanopticQuality([{"id": 1, "name": "a", "isthing": 1}, {"id": 1, "name": "b", "isthing": 1}])


# ---------------------------------------------------------------------------
# semantic mIoU


def test_semantic_confusion_matches_numpy():
    rng = np.random.default_rng(0)
    n = 5
    metric = SemanticConfusion(n, names=[f"c{k}" for k in range(1, n + 1)])
    inter, union = np.zeros(n + 1), np.zeros(n + 1)
    correct = labelled = 0
    for _ in range(4):
        gt = rng.integers(0, n, (20, 30))  # class 5 never in gt
        pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, n + 1, gt.shape))
        metric.update(pred, gt)
        keep = gt != 0
        for c in range(1, n + 1):
            g, p = gt == c, (pred == c) & keep
            inter[c] += np.sum(g & p)
            union[c] += np.sum(g | p)
        correct += np.sum((pred == gt) & keep)
        labelled += keep.sum()
    result = metric.compute()
    expected = {f"c{c}": inter[c] / union[c] for c in range(1, n + 1) if union[c]}
    assert result["per_class"].keys() == expected.keys() and "c5" in expected, "predicted-only classes count"
    for name, iou in expected.items():
        assert result["per_class"][name] == pytest.approx(iou)
    assert result["miou"] == pytest.approx(np.mean(list(expected.values())))
    assert result["pixel_accuracy"] == pytest.approx(correct / labelled)
    matrix = np.array(result["matrix"])
    assert matrix.shape == (n, n + 1) and matrix.sum() == labelled
    assert [matrix[c - 1, c] for c in range(1, n + 1)] == [inter[c] for c in range(1, n + 1)]


def test_semantic_confusion_ignores_unlabelled_and_penalises_void_predictions():
    metric = SemanticConfusion(2)
    gt = np.array([[0, 0, 1, 1]])
    metric.update(np.array([[2, 2, 1, 0]]), gt)  # class 2 only on unlabelled pixels; one class-1 pixel predicted 0
    result = metric.compute()
    assert result["per_class"] == {1: 0.5} and result["miou"] == 0.5
    with pytest.raises(ValueError, match="outside"):
        metric.update(np.array([[3, 0, 0, 0]]), gt)
    with pytest.raises(ValueError, match="one shape"):
        metric.update(gt[:, :2], gt)
    with pytest.raises(ValueError, match="num_classes"):
        SemanticConfusion(0)
