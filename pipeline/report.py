"""The run report: the per-round table, PNG plots of pseudo-label IoU and student mask AP per round (overall and
per class), and galleries of the best and worst pseudo labels by IoU, gathered in ``report.md``.

Everything here reads the rounds' ``metrics.json`` dicts (see ``pipeline.rounds``), so a report can be redrawn
from a run folder at any time; the galleries are drawn by the evaluate stage, which has the masks at hand.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from boxmask_common.files import atomic_write_bytes

from .datasets.base import Dataset
from .evaluation import ShardQuality
from .render import contact_sheet, label_tile
from .shards import decode_rle, iter_shard_tables


def _pct(v) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"


def _num(v, digits: int = 3) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _secs(stage: dict | None) -> str:
    return "-" if not stage else f"{stage['seconds']:.0f}"


def round_rows(metrics: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """The per-round table: header and one row of strings per round."""
    head = ["round", "teacher", "fit", "net weight", "label IoU", "box IoU", "Spearman", "mask AP", "AP50",
            "box-as-mask AP", "train s", "label s", "eval s"]
    rows = []
    for m in metrics:
        pl, st = m["pseudo_labels"], m.get("student") or {}
        mask, boxes = st.get("mask") or {}, st.get("box_as_mask") or {}
        fusion = (m["stages"].get("label") or {}).get("fusion") or {}
        rows.append([str(m["round"]), m["teacher"][:12], _num(fusion.get("fit"), 3),
                     _num(fusion.get("network_weight"), 3), _num(pl["labels"]["overall"]["mean_iou"], 4),
                     _num(pl["box_as_mask"]["overall"]["mean_iou"], 4), _num(pl["score_spearman"]),
                     _pct(mask.get("ap")), _pct(mask.get("ap50")), _pct(boxes.get("ap")),
                     _secs(m["stages"].get("train")), _secs(m["stages"].get("label")),
                     _secs(m["stages"].get("evaluate"))])
    return head, rows


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def per_class_rows(metrics: Sequence[dict], figure: str) -> tuple[list[str], list[list[str]]]:
    """Classes x rounds of ``figure``: "iou" (pseudo-label mean IoU) or "ap" (student mask AP)."""
    if figure == "ap":
        metrics = [m for m in metrics if (m.get("student") or {}).get("mask")]
    classes: list[str] = []
    for m in metrics:
        source = m["pseudo_labels"]["labels"]["per_class"] if figure == "iou" \
            else ((m.get("student") or {}).get("mask") or {}).get("per_class", {})
        classes += [c for c in source if c not in classes]
    head = ["class", *(f"round {m['round']}" for m in metrics)]
    rows = []
    for c in classes:
        row = [c]
        for m in metrics:
            if figure == "iou":
                row.append(_num(m["pseudo_labels"]["labels"]["per_class"].get(c, {}).get("mean_iou"), 4))
            else:
                row.append(_pct(((m.get("student") or {}).get("mask") or {}).get("per_class", {}).get(c)))
        rows.append(row)
    return head, rows


def _series(metrics: Sequence[dict], get) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for m in metrics:
        v = get(m)
        if v is not None and math.isfinite(v):
            xs.append(m["round"])
            ys.append(v)
    return xs, ys


def plot_rounds(metrics: Sequence[dict], plots: Path) -> list[str]:
    """``pseudo_label_iou.png`` and ``mask_ap.png`` under ``plots``; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    written = []
    iou = lambda m: m["pseudo_labels"]["labels"]  # noqa: E731
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(*_series(metrics, lambda m: iou(m)["overall"]["mean_iou"]), "o-", color="black", lw=2, label="all")
    ax.plot(*_series(metrics, lambda m: m["pseudo_labels"]["box_as_mask"]["overall"]["mean_iou"]), "--",
            color="grey", label="box as mask")
    _, rows = per_class_rows(metrics, "iou")
    for cls, *_ in rows:
        ax.plot(*_series(metrics, lambda m, c=cls: iou(m)["per_class"].get(c, {}).get("mean_iou")), ".-", lw=1,
                label=cls)
    _finish(ax, "pseudo-label mean IoU (train)", "mean IoU")
    fig.savefig(plots / "pseudo_label_iou.png", bbox_inches="tight")
    plt.close(fig)
    written.append("pseudo_label_iou.png")

    trained = [m for m in metrics if (m.get("student") or {}).get("mask")]
    if trained:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        ax.plot(*_series(trained, lambda m: m["student"]["mask"]["ap"]), "o-", color="black", lw=2, label="mask AP")
        ax.plot(*_series(trained, lambda m: m["student"]["box_as_mask"]["ap"]), "--", color="grey",
                label="box-as-mask AP")
        _, rows = per_class_rows(trained, "ap")
        for cls, *_ in rows:
            ax.plot(*_series(trained, lambda m, c=cls: m["student"]["mask"]["per_class"].get(c)), ".-", lw=1,
                    label=cls)
        _finish(ax, f"student mask AP ({trained[-1]['student']['split']})", "AP")
        fig.savefig(plots / "mask_ap.png", bbox_inches="tight")
        plt.close(fig)
        written.append("mask_ap.png")
    return written


def _finish(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")


def gallery(dataset: Dataset, shard_dir: str | os.PathLike, quality: ShardQuality, count: int,
            worst: bool) -> np.ndarray | None:
    """A contact sheet of the ``count`` best (or worst) pseudo labels by IoU (of those ``quality`` kept), each
    captioned with its IoU, score, class and image; None when there is nothing to draw. (H, W, 3) uint8 RGB."""
    chosen = (quality.worst if worst else quality.best)[:count]
    if not chosen:
        return None
    wanted = {(r.image_id, r.instance_id) for r, _ in chosen}
    rows: dict[tuple[str, int], dict] = {}
    for table in iter_shard_tables(shard_dir, columns=["image_id", "instance_id", "box", "mask_rle", "height",
                                                       "width"]):
        for row in table.to_pylist():
            key = (row["image_id"], int(row["instance_id"]))
            if key in wanted:
                rows[key] = row
    tiles = []
    for r, score in chosen:
        row = rows[(r.image_id, r.instance_id)]
        image = dataset.get(r.image_id).load_image()
        mask = decode_rle(row["mask_rle"], row["height"], row["width"])
        caption = f"IoU {r.iou:.2f} s {score:.2f} " \
                  f"{dataset.category_name(r.category_id)} {r.image_id}"
        tiles.append(label_tile(image, mask, np.asarray(row["box"]), caption))
    return contact_sheet(tiles)


def write_png(path: Path, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: cannot encode the PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data.tobytes())


def write_report(folder: Path, title: str, metrics: Sequence[dict], rounds_planned: int) -> Path:
    """``report.md`` and ``plots/`` of a run folder from its rounds' metrics."""
    plots = plot_rounds(metrics, folder / "plots") if metrics else []
    head, rows = round_rows(metrics)
    parts = [f"# {title}", "",
             f"{len(metrics)} of {rounds_planned + 1} rounds evaluated (round 0 is the box-prior teacher; round r "
             f"trains the student on round r-1's labels and labels again with its EMA weights). Fit: mean IoU of the "
             f"round's network-mode labels with the labels it was trained on, on a sample of training images; net "
             f"weight: the fused unary's network weight that fit set (0: box prior alone). Label IoU: mean "
             f"IoU of the pseudo labels against the ground truth of the training split; box IoU: the filled boxes; "
             f"Spearman: rank correlation of the rows' score with their IoU; mask AP, AP50 and box-as-mask AP: "
             f"the student's EMA weights on the evaluation split, in percent.", "",
             "## Rounds", "", markdown_table(head, rows), ""]
    for name, caption in (("pseudo_label_iou.png", "Pseudo-label IoU per round"), ("mask_ap.png",
                                                                                  "Student mask AP per round")):
        if name in plots:
            parts += [f"![{caption}](plots/{name})", ""]
    for figure, caption in (("iou", "Pseudo-label mean IoU per class"), ("ap", "Student mask AP per class")):
        head, rows = per_class_rows(metrics, figure)
        if rows:
            parts += [f"## {caption}", "", markdown_table(head, rows), ""]
    if metrics:
        last = metrics[-1]["round"]
        for kind in ("best", "worst"):
            name = f"round-{last}-{kind}.png"
            if (folder / "plots" / name).exists():
                parts += [f"## The {kind} pseudo labels of round {last} by IoU", "", f"![{kind}](plots/{name})", ""]
    path = folder / "report.md"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path
