"""Box-to-mask quality and speed of the structured teacher (box-prior mode) against classical anchors.

On coco_tiny (real COCO photographs; mean mask IoU over non-crowd instances with both box sides >= 8 px) prints
mean IoU and ms per instance for box-as-mask, the inscribed ellipse, OpenCV GrabCut and the teacher, the teacher's
per-stage time split, its score calibration (Spearman correlation of score and IoU, mean IoU per score quintile),
optionally a stage ablation (--ablation), a toy-data table with and without depth (--depth-ablation) and the
overlap table (--occlusion: `teacher.occlusion` off against joint, split by how much of each box overlaps another,
beside the oracle). Timing runs on ONE CPU thread. The last line is one JSON object; each table is also recorded
(bench/results.py) as bench/results/teacher.json, teacher-occlusion.json or teacher-network-<dataset>.json.

    .venv/bin/python bench/teacher.py [--data ../shared/devdata/coco_tiny] [--limit N] [--ablation]
                                      [--depth-ablation] [--no-grabcut]
                                      [--occlusion [--toy-checkpoint T.pt] [--large-images N]]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from tqdm import tqdm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from teacher import StructuredTeacher  # noqa: E402
from teacher.config import TeacherConfig  # noqa: E402
from teacher.structured_teacher import STAGES  # noqa: E402
from bench import results as bench_results  # noqa: E402

MIN_SIDE = 8.0
GRABCUT_ITERS = 5
GRABCUT_PAD = 0.25
GRABCUT_MIN_KEEP = 0.10


def load_coco(root: Path, limit: int | None, holdout: float = 0.0) -> list[dict]:
    """coco_tiny records: image (H,W,3) uint8 RGB, boxes (N,4) x1y1x2y2, classes (N,), gts list of (H,W) bool.
    ``holdout``: leave out the images `pipeline run` holds out with that dataset.holdout (the training images)."""
    from pipeline.datasets.coco import is_held_out

    ann = root / "annotations.json"
    if not ann.is_file():
        raise SystemExit(f"bench/teacher.py: --data {root}: no annotations.json there")
    coco = COCO(str(ann))
    records = []
    for img_id in [i for i in sorted(coco.getImgIds()) if not is_held_out(str(i), holdout)][:limit]:
        info = coco.loadImgs(img_id)[0]
        bgr = cv2.imread(str(root / info["file_name"]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SystemExit(f"bench/teacher.py: cannot read {root / info['file_name']}")
        boxes, classes, gts = [], [], []
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False)):
            x, y, w, h = a["bbox"]
            if w < MIN_SIDE or h < MIN_SIDE:
                continue
            boxes.append([x, y, x + w, y + h])
            classes.append(a["category_id"])
            gts.append(coco.annToMask(a).astype(bool))
        records.append(dict(image_id=str(img_id), image=np.ascontiguousarray(bgr[:, :, ::-1]),
                            boxes=np.asarray(boxes, np.float32).reshape(-1, 4), classes=np.asarray(classes, np.int64),
                            gts=gts))
    return records


def iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.count_nonzero(a & b)
    union = np.count_nonzero(a | b)
    return inter / union if union else 1.0


def pixel_centres(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(height)[:, None] + 0.5, np.arange(width)[None, :] + 0.5


def box_as_mask(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """The pixels a box touches (floor / ceil of its corners), as the anchor table counts it."""
    m = np.zeros((height, width), bool)
    x1, y1, x2, y2 = box
    m[int(math.floor(y1)) : int(math.ceil(y2)), int(math.floor(x1)) : int(math.ceil(x2))] = True
    return m


def ellipse(box: np.ndarray, height: int, width: int) -> np.ndarray:
    ys, xs = pixel_centres(height, width)
    x1, y1, x2, y2 = box
    return ((xs - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2 + ((ys - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2 <= 1


def grabcut(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """cv2.grabCut, 5 iterations on a padded crop; box-as-mask when it keeps < 10% of the box."""
    height, width = image.shape[:2]
    fallback = box_as_mask(box, height, width)
    x1, y1, x2, y2 = box
    pw, ph = GRABCUT_PAD * (x2 - x1), GRABCUT_PAD * (y2 - y1)
    cx0, cy0 = max(int(x1 - pw), 0), max(int(y1 - ph), 0)
    cx1, cy1 = min(int(math.ceil(x2 + pw)), width), min(int(math.ceil(y2 + ph)), height)
    crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1, ::-1])
    rect = (int(x1) - cx0, int(y1) - cy0, max(int(math.ceil(x2 - x1)), 1), max(int(math.ceil(y2 - y1)), 1))
    mask = np.zeros(crop.shape[:2], np.uint8)
    try:
        cv2.grabCut(crop, mask, rect, np.zeros((1, 65)), np.zeros((1, 65)), GRABCUT_ITERS, cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        return fallback
    out = np.zeros((height, width), bool)
    out[cy0:cy1, cx0:cx1] = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    out &= fallback
    if out.sum() < GRABCUT_MIN_KEEP * fallback.sum():
        return fallback
    return out


def run_anchor(records: list[dict], fn, desc: str) -> tuple[float, float]:
    ious, elapsed, n = [], 0.0, 0
    for r in tqdm(records, desc=desc, leave=False):
        h, w = r["image"].shape[:2]
        for box, gt in zip(r["boxes"], r["gts"]):
            t0 = time.perf_counter()
            m = fn(r["image"], box, h, w)
            elapsed += time.perf_counter() - t0
            n += 1
            ious.append(iou(m, gt))
    return float(np.mean(ious)), 1000 * elapsed / max(n, 1)


def oracle_ious(masks: list[np.ndarray], gts: list[np.ndarray]) -> list[float]:
    """IoU of each label after removing the pixels that belong only to other instances' ground truth: the ceiling
    of resolving overlaps (every label gains or stays)."""
    out = []
    for i, (m, g) in enumerate(zip(masks, gts)):
        others = np.zeros_like(g)
        for j, h in enumerate(gts):
            if j != i:
                others |= h
        out.append(iou(m & ~(others & ~g), g))
    return out


def disjoint_oracle_ious(masks: list[np.ndarray], gts: list[np.ndarray], boxes: np.ndarray) -> list[float]:
    """IoU of each label after the best disjoint answer joint resolution could give (the ceiling of its decision
    space): every pixel inside two or more boxes that some label claims goes to the smallest ground-truth instance
    among the labels that claim it, or to none when no claimant's ground truth holds it. "Smallest" because COCO's
    masks overlap (a table's mask holds its cups): the pixel is worth more IoU to the small instance."""
    if not masks:
        return []
    claims = np.stack(masks)
    contested = (box_covers(boxes, *claims.shape[1:]).sum(0) >= 2) & claims.any(0)
    out = claims & ~contested
    taken = np.zeros(claims.shape[1:], bool)
    for k in np.argsort([g.sum() for g in gts], kind="stable"):
        won = contested & claims[k] & gts[k] & ~taken
        out[k] |= won
        taken |= won
    return [iou(m, g) for m, g in zip(out, gts)]


def box_covers(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N,H,W) bool: the pixels each box touches (`box_as_mask`)."""
    cover = np.zeros((len(boxes), height, width), bool)
    for k, b in enumerate(boxes):
        cover[k] = box_as_mask(b, height, width)
    return cover


def overlap_shares(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N,) share of each box's pixels (floor / ceil of its corners) that lie inside another box."""
    cover = box_covers(boxes, height, width)
    total = cover.sum(0)
    return np.array([(total[c] >= 2).mean() if c.any() else 0.0 for c in cover])


def run_teacher(records: list[dict], cfg: TeacherConfig, desc: str = "teacher", with_depth: bool = False,
                network=None, oracle: bool = False) -> dict:
    """Label every record in order (the bank fills as it goes; ``network_batch`` images per call, as the label
    service does) -> mean IoU, ms/instance, stage split, scores; with ``oracle`` also `oracle_ious` and
    `disjoint_oracle_ious` per label."""
    teacher = StructuredTeacher(network, cfg)
    ious, scores, elapsed, oracles, disjoint = [], [], 0.0, [], []
    step = cfg.network_batch
    for start in tqdm(range(0, len(records), step), desc=desc, leave=False):
        chunk = records[start:start + step]
        t0 = time.perf_counter()
        labels = teacher.label_batch([r["image"] for r in chunk], [r["boxes"] for r in chunk],
                                     [r["classes"] for r in chunk],
                                     [r.get("depth") if with_depth else None for r in chunk],
                                     [r["image_id"] for r in chunk])
        elapsed += time.perf_counter() - t0
        for r, image_labels in zip(chunk, labels):
            for lab, gt in zip(image_labels, r["gts"]):
                ious.append(iou(lab.mask, gt))
                scores.append(lab.score)
            if oracle:
                masks = [lab.mask for lab in image_labels]
                oracles += oracle_ious(masks, r["gts"])
                disjoint += disjoint_oracle_ious(masks, r["gts"], r["boxes"])
    n = max(len(ious), 1)
    return dict(miou=float(np.mean(ious)) if ious else float("nan"), ms=1000 * elapsed / n,
                stages={s: 1000 * teacher.timings[s] / n for s in STAGES}, ious=np.asarray(ious),
                scores=np.asarray(scores), bank=teacher.bank.fill(), oracle=np.asarray(oracles),
                disjoint_oracle=np.asarray(disjoint))


def ablation_configs(base: TeacherConfig) -> list[tuple[str, TeacherConfig]]:
    """Cumulative stages: prior only, + colour model, + CRF, + refinement, + correspondence."""
    steps = []
    cfg = copy.deepcopy(base)
    cfg.box_prior.color_weight, cfg.crf.iters, cfg.refine.steps, cfg.use_correspondence = 0.0, 0, 0, False
    steps.append(("prior only (superellipse)", copy.deepcopy(cfg)))
    cfg.box_prior.color_weight = base.box_prior.color_weight
    steps.append(("+ colour model", copy.deepcopy(cfg)))
    cfg.crf.iters = base.crf.iters
    steps.append(("+ CRF", copy.deepcopy(cfg)))
    cfg.refine.steps = base.refine.steps
    steps.append(("+ refinement", copy.deepcopy(cfg)))
    cfg.use_correspondence = True
    steps.append(("+ correspondence", copy.deepcopy(cfg)))
    return steps


def toy_records(train: int, seed: int, size: tuple[int, int] = (256, 512)) -> list[dict]:
    """Toy street scenes with depth (pipeline's generator) at size (H, W), GT masks through the dataset's
    evaluation hook."""
    from pipeline.datasets.cityscapes import CityscapesDataset
    from pipeline.datasets.toy import generate_toy
    from pipeline.evaluation import gt_masks

    root = generate_toy(Path(tempfile.mkdtemp(prefix="toy_bench_")), train=train, val=0, seed=seed, size=size)
    ds = CityscapesDataset(root, "train")
    records = []
    for sample in ds:
        gts = gt_masks(ds, sample)
        keep = [i for i, b in enumerate(sample.boxes) if min(b[2] - b[0], b[3] - b[1]) >= MIN_SIDE
                and int(sample.instance_ids[i]) in gts]
        records.append(dict(image_id=str(sample.image_id), image=sample.load_image(), depth=sample.load_depth(),
                            boxes=sample.boxes[keep].astype(np.float32), classes=sample.classes[keep].astype(np.int64),
                            gts=[gts[int(sample.instance_ids[i])] for i in keep]))
    return records


def calibration(ious: np.ndarray, scores: np.ndarray) -> tuple[float, list[float]]:
    rho = float(spearmanr(scores, ious).statistic) if len(ious) > 2 else float("nan")
    order = np.argsort(scores, kind="stable")
    return rho, [float(ious[q].mean()) for q in np.array_split(order, 5)]


# (network_weight, prior_weight); the last row has a negligible network weight: the box prior's logits halved,
# which tells how much of a fused gain is the softer unary rather than the network.
FUSION_SWEEP = [(1.0, 1.0), (0.5, 1.0), (0.35, 0.35), (0.25, 0.5), (1.0, 0.5), (1e-9, 0.5)]


def network_tables(args) -> dict:
    """Pseudo-label mean IoU, ms/instance and score Spearman in box-prior, network and fused modes, with the
    teacher section of each dataset's config (as ``pipeline label`` runs it)."""
    import dataclasses

    import student  # noqa: F401  (registers the student's network)
    from pipeline.config import config_path_for, load_config
    from teacher.network import build_network

    figures: dict = {}
    for name, ckpt, config in (("toy", args.toy_checkpoint, "toy"), ("coco_tiny", args.coco_checkpoint, "coco")):
        if ckpt is None:
            continue
        network = build_network(torch.load(ckpt, map_location="cpu", weights_only=True), str(ckpt))
        base = dataclasses.replace(load_config(config_path_for(config), []).teacher, device="cpu")
        if name == "toy":
            records, depth = toy_records(24, seed=0), True
        else:
            records, depth = load_coco(args.data, args.limit, args.holdout), False
        n = sum(len(r["boxes"]) for r in records)
        printed = bench_results.Capture()
        print(f"\n{name}: {len(records)} images, {n} instances (box sides >= {MIN_SIDE:g} px), checkpoint {ckpt}")
        print(f"{'mode':28s} {'mean IoU':>9s} {'ms/inst':>9s} {'Spearman':>9s}")
        modes = [("box-prior", None, base)]
        modes += [(m, network, dataclasses.replace(base, unary=m)) for m in ("network", "fused")]
        if args.fusion_sweep:
            modes += [(f"fused wn={wn:g} wp={wp:g}", network, dataclasses.replace(
                base, unary="fused", fusion=dataclasses.replace(base.fusion, network_weight=wn, prior_weight=wp)))
                for wn, wp in FUSION_SWEEP]
        for mode, net, cfg in modes:
            r = run_teacher(records, cfg, desc=mode, with_depth=depth, network=net)
            rho, _ = calibration(r["ious"], r["scores"])
            print(f"{mode:28s} {r['miou']:9.4f} {r['ms']:9.2f} {rho:9.3f}", flush=True)
            if " " not in mode:
                figures[f"{name}_{mode}_miou"] = round(r["miou"], 4)
                figures[f"{name}_{mode}_ms"] = round(r["ms"], 2)
                figures[f"{name}_{mode}_spearman"] = round(rho, 3)
        bench_results.record(f"teacher-network-{name}", f"Network-mode teacher on {name} (`bench/teacher.py`)",
                             bench_results.command(), bench_results.fenced(printed.stop()),
                             {k: v for k, v in figures.items() if k.startswith(f"{name}_")}, NETWORK_NOTES)
    return figures


NETWORK_NOTES = ("Pseudo-label mean IoU against the ground truth (box sides >= 8 px), ms per instance on one CPU "
                 "thread, and Spearman = rank correlation of the label's score with its IoU, per teacher.unary mode; "
                 "the teacher section of each dataset's config otherwise. `fused wn wp`: fusion.network_weight and "
                 "prior_weight.")


OVERLAP_BINS = (("none", 0.0, 0.0), ("< 30 %", 1e-9, 0.3 - 1e-9), (">= 30 %", 0.3, 1.0))


def occlusion_tables(args) -> dict:
    """`teacher.occlusion` off against joint: mean IoU, ms/instance and score Spearman on toy train (box-prior, and
    fused with --toy-checkpoint's student) and coco_tiny (box-prior), split by overlap share, with the oracle.
    Each dataset's config gives the rest of the teacher (``pipeline label`` runs it so)."""
    import dataclasses

    from pipeline.config import config_path_for, load_config

    cases = []
    toy_teacher = dataclasses.replace(load_config(config_path_for("toy"), []).teacher, device="cpu")
    toy = toy_records(args.toy_images, seed=0)
    cases.append(("toy", "box-prior", toy, True, toy_teacher, None))
    if args.toy_checkpoint:
        import student  # noqa: F401  (registers the student's network)
        from teacher.network import build_network

        net = build_network(torch.load(args.toy_checkpoint, map_location="cpu", weights_only=True),
                            str(args.toy_checkpoint))
        cases.append(("toy", "fused", toy, True, dataclasses.replace(toy_teacher, unary="fused"), net))
    if args.large_images:
        # Cityscapes' image size: the contested regions grow with the image while the RoI stages do not.
        big = toy_records(args.large_images, seed=0, size=(1024, 2048))
        city = dataclasses.replace(load_config(config_path_for("cityscapes"), []).teacher, device="cpu")
        cases.append(("toy 1024x2048", "box-prior", big, True, city, None))
    coco = load_coco(args.data, args.limit)
    coco_teacher = dataclasses.replace(load_config(config_path_for("coco"), []).teacher, device="cpu")
    cases.append(("coco_tiny", "box-prior", coco, False, coco_teacher, None))
    figures: dict = {}
    print("\noverlaps: teacher.occlusion off -> joint; oracle = off's labels minus the pixels that only other "
          "instances' ground truth holds; captured = (joint - off) / (oracle - off); disjoint = the best disjoint "
          "answer among the claiming labels (`disjoint_oracle_ious`)")
    print("off: per-box masks scored with the score-only joint pass (`teacher.joint.score_when_off`); alone: the "
          "same masks without it (the score before that pass); x = ms / ms alone; every ms: the faster of two "
          "runs")
    print(f"{'data':14s} {'mode':10s} {'inst':>5s} {'off':>7s} {'joint':>7s} {'oracle':>7s} {'disjoint':>8s} "
          f"{'captured':>9s} {'ms alone':>8s} {'ms off':>7s} {'x':>5s} {'ms joint':>9s} {'x':>5s} "
          f"{'rho alone':>9s} {'rho off':>8s} {'rho joint':>9s}")
    splits = []
    for data, mode, records, depth, cfg, net in cases:
        plain = dataclasses.replace(cfg, occlusion="off", joint=dataclasses.replace(cfg.joint, score_when_off=False))
        alone = run_teacher(records, plain, f"{data} {mode} alone", depth, net)
        off = run_teacher(records, dataclasses.replace(cfg, occlusion="off"), f"{data} {mode} off", depth, net, True)
        joint = run_teacher(records, dataclasses.replace(cfg, occlusion="joint"), f"{data} {mode} joint", depth, net)
        if not np.array_equal(alone["ious"], off["ious"]):
            raise SystemExit(f"{data} {mode}: the score-only pass changed the off masks")
        # The cost ratio is a few percent on runs of seconds: time alone and off once more, in the other order, and
        # keep each one's faster run (the first run of a process also pays its warm-up).
        off["ms"] = min(off["ms"], run_teacher(records, dataclasses.replace(cfg, occlusion="off"), f"{data} {mode} off",
                                               depth, net)["ms"])
        alone["ms"] = min(alone["ms"], run_teacher(records, plain, f"{data} {mode} alone", depth, net)["ms"])
        joint["ms"] = min(joint["ms"], run_teacher(records, dataclasses.replace(cfg, occlusion="joint"),
                                                   f"{data} {mode} joint", depth, net)["ms"])
        rho_alone, _ = calibration(alone["ious"], alone["scores"])
        rho_off, _ = calibration(off["ious"], off["scores"])
        rho_joint, _ = calibration(joint["ious"], joint["scores"])
        oracle = float(off["oracle"].mean())
        disjoint = float(off["disjoint_oracle"].mean())
        captured = (joint["miou"] - off["miou"]) / max(oracle - off["miou"], 1e-9)
        print(f"{data:14s} {mode:10s} {len(off['ious']):5d} {off['miou']:7.4f} {joint['miou']:7.4f} {oracle:7.4f} "
              f"{disjoint:8.4f} {captured:9.2f} {alone['ms']:8.2f} {off['ms']:7.2f} {off['ms'] / alone['ms']:5.2f} "
              f"{joint['ms']:9.2f} {joint['ms'] / alone['ms']:5.2f} {rho_alone:9.3f} {rho_off:8.3f} {rho_joint:9.3f}",
              flush=True)
        key = f"occlusion_{data.replace(' ', '_')}_{mode.replace('-', '_')}"
        figures.update({f"{key}_off_miou": round(off["miou"], 4), f"{key}_joint_miou": round(joint["miou"], 4),
                        f"{key}_oracle_miou": round(oracle, 4), f"{key}_disjoint_oracle_miou": round(disjoint, 4),
                        f"{key}_captured": round(captured, 3), f"{key}_alone_ms": round(alone["ms"], 2),
                        f"{key}_off_ms": round(off["ms"], 2), f"{key}_joint_ms": round(joint["ms"], 2),
                        f"{key}_off_cost_ratio": round(off["ms"] / alone["ms"], 3),
                        f"{key}_alone_spearman": round(rho_alone, 3),
                        f"{key}_off_spearman": round(rho_off, 3), f"{key}_joint_spearman": round(rho_joint, 3)})
        shares = np.concatenate([overlap_shares(r["boxes"], *r["image"].shape[:2]) for r in records])
        splits.append((data, mode, shares, off, joint))
    print("\nby the share of the box inside another box: instances, mean IoU off / joint / oracle")
    print(f"{'data':14s} {'mode':10s} " + " ".join(f"{name:>28s}" for name, _, _ in OVERLAP_BINS))
    for data, mode, shares, off, joint in splits:
        cells = []
        for name, lo, hi in OVERLAP_BINS:
            sel = (shares >= lo) & (shares <= hi)
            if sel.any():
                cells.append(f"{int(sel.sum()):4d}: {off['ious'][sel].mean():.3f} / {joint['ious'][sel].mean():.3f} "
                             f"/ {off['oracle'][sel].mean():.3f}")
                slug = name.replace(" ", "").replace("%", "").replace("<", "lt").replace(">=", "ge")
                key = f"occlusion_{data.replace(' ', '_')}_{mode.replace('-', '_')}_{slug}"
                figures.update({f"{key}_off_miou": round(float(off["ious"][sel].mean()), 4),
                                f"{key}_joint_miou": round(float(joint["ious"][sel].mean()), 4)})
            else:
                cells.append("-")
        print(f"{data:14s} {mode:10s} " + " ".join(f"{c:>28s}" for c in cells))
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "devdata" / "coco_tiny",
                    help="coco_tiny folder (annotations.json + images/)")
    ap.add_argument("--limit", type=int, default=None, help="first N images only")
    ap.add_argument("--holdout", type=float, default=0.0, metavar="F",
                    help="with --coco-checkpoint: only the training images of a run with dataset.holdout F")
    ap.add_argument("--ablation", action="store_true", help="cumulative stage ablation table")
    ap.add_argument("--depth-ablation", action="store_true", help="toy data with and without depth")
    ap.add_argument("--toy-images", type=int, default=24, help="toy train images for --depth-ablation and --occlusion")
    ap.add_argument("--no-grabcut", action="store_true", help="skip GrabCut (slow: ~0.2 s per instance)")
    ap.add_argument("--toy-checkpoint", type=Path, help="teacher.pt of a student trained on toy box-prior shards: "
                                                        "box-prior / network / fused table on toy train")
    ap.add_argument("--coco-checkpoint", type=Path, help="teacher.pt of a student trained on coco_tiny box-prior "
                                                         "shards: the same table on coco_tiny")
    ap.add_argument("--fusion-sweep", action="store_true", help="with a checkpoint: fused IoU over a grid of "
                                                                "(network_weight, prior_weight)")
    ap.add_argument("--skip-anchors", action="store_true", help="only the network-mode (and --occlusion) tables")
    ap.add_argument("--large-images", type=int, default=4, metavar="N",
                    help="with --occlusion: also N toy images at Cityscapes' 1024x2048 with the cityscapes config "
                         "(0 = skip)")
    ap.add_argument("--occlusion", action="store_true", help="teacher.occlusion off against joint on toy train and "
                                                             "coco_tiny (with --toy-checkpoint: toy fused mode too)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    figures: dict = {}
    if args.occlusion:
        printed = bench_results.Capture()
        figures.update(occlusion_tables(args))
        bench_results.record("teacher-occlusion", "Overlapping boxes: `teacher.occlusion` off against joint "
                             "(`bench/teacher.py --occlusion`)",
                             bench_results.command(), bench_results.fenced(printed.stop()), dict(figures),
                             "Mean IoU against the ground truth (box sides >= 8 px), one CPU thread. Oracle: the off "
                             "labels minus every pixel that only other instances' ground truth holds; disjoint: the "
                             "best disjoint answer among the claiming labels (the smallest true owner wins); "
                             "captured = (joint - off) / (oracle - off); x = ms joint / ms off; rho = score Spearman.")
    elif args.toy_checkpoint or args.coco_checkpoint:
        figures.update(network_tables(args))
    if args.skip_anchors:
        print(json.dumps(figures))
        return
    records = load_coco(args.data, args.limit)
    n = sum(len(r["boxes"]) for r in records)
    printed = bench_results.Capture()
    print(f"coco_tiny: {len(records)} images, {n} instances (non-crowd, box sides >= {MIN_SIDE:g} px), 1 thread")
    rows = [("box as mask",) + run_anchor(records, lambda im, b, h, w: box_as_mask(b, h, w), "box"),
            ("inscribed ellipse",) + run_anchor(records, lambda im, b, h, w: ellipse(b, h, w), "ellipse")]
    if not args.no_grabcut:
        rows.append(("GrabCut (5 it, padded crop)",) + run_anchor(records, lambda im, b, h, w: grabcut(im, b), "grabcut"))
    cfg = TeacherConfig(device="cpu")
    res = run_teacher(records, cfg)
    rows.append(("teacher (box prior)", res["miou"], res["ms"]))
    print(f"\n{'method':32s} {'mean IoU':>9s} {'ms/inst':>9s}")
    for name, m, ms in rows:
        print(f"{name:32s} {m:9.4f} {ms:9.2f}")
    print("\nteacher stage split (ms per instance): " + ", ".join(f"{s} {v:.2f}" for s, v in res["stages"].items()))
    print(f"bank fill per class: {sum(res['bank'].values())} objects in {len(res['bank'])} classes")
    rho, quint = calibration(res["ious"], res["scores"])
    print(f"score calibration: Spearman(score, IoU) = {rho:.3f}; mean IoU per score quintile (low -> high): "
          + " ".join(f"{q:.3f}" for q in quint))

    if args.ablation:
        print(f"\n{'ablation (cumulative)':32s} {'mean IoU':>9s} {'ms/inst':>9s}")
        for name, c in ablation_configs(cfg):
            r = run_teacher(records, c, desc=name)
            print(f"{name:32s} {r['miou']:9.4f} {r['ms']:9.2f}")

    if args.depth_ablation:
        toy = toy_records(args.toy_images, seed=0)
        print(f"\ntoy data: {len(toy)} images, {sum(len(r['boxes']) for r in toy)} instances")
        print(f"{'toy':32s} {'mean IoU':>9s} {'ms/inst':>9s}")
        for name, with_depth in (("teacher without depth", False), ("teacher with depth", True)):
            r = run_teacher(toy, cfg, desc=name, with_depth=with_depth)
            print(f"{name:32s} {r['miou']:9.4f} {r['ms']:9.2f}")

    anchors = {name: m for name, m, _ in rows if name != "teacher (box prior)"}
    grab = [ms for name, _, ms in rows if name.startswith("GrabCut")]
    out = {"teacher_miou": round(res["miou"], 4), "best_anchor_miou": round(max(anchors.values()), 4),
           "teacher_ms_per_instance": round(res["ms"], 2), "teacher_score_spearman": round(rho, 3),
           "grabcut_ms_per_instance": round(grab[0], 2) if grab else None}
    table = printed.stop()
    print(json.dumps({**out, **figures}))
    bench_results.record("teacher", "Box-prior teacher against classical anchors on coco_tiny (`bench/teacher.py`)",
                         bench_results.command(), bench_results.fenced(table), out,
                         "TeacherConfig's defaults, one CPU thread; mean mask IoU over non-crowd instances with both "
                         "box sides >= 8 px.")


if __name__ == "__main__":
    main()
