"""The current benchmark results, written by the benches themselves.

Each bench script ends by calling ``record(...)``: it writes ``bench/results/<name>.json`` (title, UTC date, commit,
the command that reproduces it, the readable table it printed, its JSON figures, notes) and re-renders
``bench/RESULTS.md`` from every json there: the goals' status table (``GOALS`` below), one section per result, and
the findings that set today's defaults (``bench/FINDINGS.md``, hand-written, copied verbatim). The history of every
measurement, superseded figures included, is ``bench/NOTEBOOK.md``.

    .venv/bin/python bench/results.py          # re-render bench/RESULTS.md from bench/results/*.json

The commit is ``git rev-parse --short HEAD``, with "+dirty" when tracked files other than bench/results/ and
bench/RESULTS.md have uncommitted changes. ``BENCH_NO_RECORD=1`` runs a bench without recording anything (for
trial runs that should not replace the current figures). Standard library only.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shlex
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
PAGE = BENCH / "RESULTS.md"
FINDINGS = BENCH / "FINDINGS.md"

# Section order; results not named here follow, alphabetically.
ORDER = ["kernels", "student-speed-toy", "student-speed-cityscapes-crop", "student-quality", "teacher",
         "teacher-occlusion", "teacher-network-toy", "teacher-network-coco_tiny", "label_service", "objectives",
         "run-toy", "run-coco_cpu", "run-coco_cpu_specific", "run-coco_random", "run-coco_random_agnostic"]


def get(figures: dict, key: str):
    """``figures[key]``; a dotted key walks nested dicts ("toy.step_vs_plain.ratio"). KeyError when absent."""
    value = figures
    for part in key.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            raise KeyError(key)
        value = value[part]
    return value


def pct(key: str):
    """A figure stored as a fraction, shown in percent (AP)."""
    return lambda f: 100 * get(f, key)


# One row per goal: what it says, the result (bench/results/<result>.json) its figures come from, the value (a
# figure key, or a function of the figures), the comparison, the target (a number, a figure key or a function of the
# figures) and where the goal was set.
Goal = namedtuple("Goal", "text result value op target ref")

GOALS = [
    Goal("Mean-field: fused C++ kernel / PyTorch reference speed-up", "kernels", "meanfield_speedup", ">=", 5,
         "issue 4"),
    Goal("Mean-field: share of the copy bandwidth", "kernels", "bandwidth_fraction", ">=", 0.3, "issue 4"),
    Goal("Sinkhorn (float32) speed-up over POT, at least as accurate", "kernels", "sinkhorn_speedup_vs_pot", ">=", 3,
         "issue 4"),
    Goal("Toy student: 2-worker / 1-worker images/s", "student-speed-toy", "toy.scaling", ">=", 1.6, ""),
    Goal("Cityscapes 512x1024 crops: 2-worker / 1-worker images/s", "student-speed-cityscapes-crop",
         "cityscapes-crop.scaling", ">=", 1.6, ""),
    Goal("Toy: our training step / plain torchvision Mask R-CNN step", "student-speed-toy", "toy.step_vs_plain.ratio",
         "<=", 1.3, ""),
    Goal("Cityscapes crops: our step / plain Mask R-CNN step", "student-speed-cityscapes-crop",
         "cityscapes-crop.step_vs_plain.ratio", "<=", 1.3, ""),
    Goal("Toy student from boxes: mask AP > its box-as-mask AP", "student-quality", pct("quality.boxes.mask_ap"), ">",
         pct("quality.boxes.box_as_mask_ap"), ""),
    Goal("Toy student from boxes: mask-head IoU on GT boxes > the filled box's", "student-quality",
         "quality.boxes.mask_head_iou", ">", "quality.boxes.filled_box_iou", ""),
    Goal("Toy student from shards: mask AP > its box-as-mask AP", "student-quality", pct("quality.shards.mask_ap"),
         ">", pct("quality.shards.box_as_mask_ap"), ""),
    Goal("Toy: student from shards beats student from boxes (mask AP)", "student-quality",
         pct("quality.shards.mask_ap"), ">", pct("quality.boxes.mask_ap"), ""),
    Goal("Toy train, network teacher: fused >= box-prior + 0.01", "teacher-network-toy", "toy_fused_miou", ">=",
         lambda f: get(f, "toy_box-prior_miou") + 0.01, "issue 10"),
    Goal("Toy train: fused labels' score Spearman", "teacher-network-toy", "toy_fused_spearman", ">=", 0.6,
         "issue 10"),
    Goal("coco_tiny: fused >= box-prior - 0.005", "teacher-network-coco_tiny", "coco_tiny_fused_miou", ">=",
         lambda f: get(f, "coco_tiny_box-prior_miou") - 0.005, "issue 10"),
    Goal("coco_tiny: fused labels' score Spearman", "teacher-network-coco_tiny", "coco_tiny_fused_spearman", ">=",
         0.6, "issue 10"),
    Goal("coco_tiny: network-only labels >= box-prior - 0.02", "teacher-network-coco_tiny", "coco_tiny_network_miou",
         ">=", lambda f: get(f, "coco_tiny_box-prior_miou") - 0.02, "issue 25"),
    Goal("Overlaps, toy train box-prior: joint mean IoU >= 0.727 + 0.03", "teacher-occlusion",
         "occlusion_toy_box_prior_joint_miou", ">=", 0.757, "issue 24"),
    Goal("Overlaps, coco_tiny box-prior: joint mean IoU >= 0.670 + 0.03", "teacher-occlusion",
         "occlusion_coco_tiny_box_prior_joint_miou", ">=", 0.700, "issue 24"),
    # "off" in these three is the per-box labeling alone (the `alone` column since issue 33 added the score pass).
    Goal("Overlaps: cost joint / off, toy train box-prior", "teacher-occlusion",
         lambda f: get(f, "occlusion_toy_box_prior_joint_ms") / get(f, "occlusion_toy_box_prior_alone_ms"), "<=",
         1.3, "issue 24"),
    Goal("Overlaps: cost joint / off, toy at 1024x2048", "teacher-occlusion",
         lambda f: get(f, "occlusion_toy_1024x2048_box_prior_joint_ms")
         / get(f, "occlusion_toy_1024x2048_box_prior_alone_ms"), "<=", 1.3, "issue 24"),
    Goal("Overlaps: cost joint / off, coco_tiny", "teacher-occlusion",
         lambda f: get(f, "occlusion_coco_tiny_box_prior_joint_ms")
         / get(f, "occlusion_coco_tiny_box_prior_alone_ms"), "<=", 1.3, "issue 24"),
    Goal("Overlaps: coco_tiny score Spearman with joint", "teacher-occlusion",
         "occlusion_coco_tiny_box_prior_joint_spearman", ">=", 0.55, "issue 24"),
    Goal("Score sees overlaps: coco_tiny box-prior Spearman with off", "teacher-occlusion",
         "occlusion_coco_tiny_box_prior_off_spearman", ">=", 0.57, "issue 33"),
    Goal("Score sees overlaps: toy box-prior Spearman with off, not below the plain off's", "teacher-occlusion",
         "occlusion_toy_box_prior_off_spearman", ">=", "occlusion_toy_box_prior_alone_spearman", "issue 33"),
    Goal("Score-only pass: cost / plain off per instance, coco_tiny", "teacher-occlusion",
         "occlusion_coco_tiny_box_prior_off_cost_ratio", "<=", 1.15, "issue 33"),
    Goal("Score-only pass: cost / plain off per instance, toy train", "teacher-occlusion",
         "occlusion_toy_box_prior_off_cost_ratio", "<=", 1.15, "issue 33"),
    Goal("Score-only pass: cost / plain off per instance, toy at 1024x2048", "teacher-occlusion",
         "occlusion_toy_1024x2048_box_prior_off_cost_ratio", "<=", 1.15, "issue 33"),
    Goal("Index labeling: driver peak RSS MiB at 1M images", "scale", "1000000_driver_peak_rss_mib", "<=", 1024,
         "issue 32"),
    Goal("Index labeling: driver peak RSS at 1M / at 10k", "scale", "driver_rss_ratio_largest_smallest", "<=", 1.2,
         "issue 32"),
    Goal("Index labeling: seconds to the first shard at 1M images", "scale", "1000000_first_shard_s", "<=", 30,
         "issue 32"),
    Goal("Index labeling: seconds to the first new shard after a SIGKILL at 1M", "scale", "1000000_resume_s", "<=",
         30, "issue 32"),
    Goal("Index labeling: images/s per worker / in memory, toy", "label_paths", "toy_index_over_memory", ">=", 0.95,
         "issue 32"),
    Goal("Index labeling: images/s per worker / in memory, coco_tiny", "label_paths", "coco_tiny_index_over_memory",
         ">=", 0.95, "issue 32"),
    Goal("Toy `pipeline run --rounds 3`: wall minutes", "run-toy", lambda f: get(f, "toy_wall_s") / 60, "<=", 15,
         "issue 11"),
    Goal("Toy run: round-3 label IoU > round 0's", "run-toy", "toy_round3_label_iou", ">", "toy_round0_label_iou",
         "issue 11"),
    Goal("Toy run: largest label IoU drop between rounds", "run-toy", "toy_largest_drop", "<=", 0.005, "issue 11"),
    # 0.620: round 0 of `pipeline run --dataset toy` at 5bef7ac, before the score saw overlaps (labels identical).
    Goal("Toy run: round-0 score Spearman not below the score before it saw overlaps", "run-toy",
         "toy_round0_spearman", ">=", 0.620, "issue 33"),
    Goal("Toy run: round-3 mask AP > box-as-mask AP", "run-toy", "toy_round3_mask_ap", ">",
         "toy_round3_box_as_mask_ap", "issue 11"),
    Goal("coco_cpu: round-2 label IoU >= round 0 + 0.02", "run-coco_cpu", "coco_cpu_round2_label_iou", ">=",
         lambda f: get(f, "coco_cpu_round0_label_iou") + 0.02, "issue 25"),
    Goal("coco_cpu: round-2 mask AP > box-as-mask AP (held-out images)", "run-coco_cpu", "coco_cpu_round2_mask_ap",
         ">", "coco_cpu_round2_box_as_mask_ap", "issue 25"),
    Goal("coco_cpu: wall minutes", "run-coco_cpu", lambda f: get(f, "coco_cpu_wall_s") / 60, "<=", 45, "issue 25"),
    Goal("coco_random: no round below round 0 - 0.003", "run-coco_random",
         lambda f: min(get(f, f"coco_random_round{r}_label_iou") for r in (1, 2)), ">=",
         lambda f: get(f, "coco_random_round0_label_iou") - 0.003, "issue 25"),
    Goal("coco_random, class-agnostic head: no round below round 0 - 0.003", "run-coco_random_agnostic",
         lambda f: min(get(f, f"coco_random_agnostic_round{r}_label_iou") for r in (1, 2)), ">=",
         lambda f: get(f, "coco_random_agnostic_round0_label_iou") - 0.003, "issue 25"),
]

OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}


def commit() -> str:
    """Short HEAD, "+dirty" when tracked files outside bench/results/ and bench/RESULTS.md have changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results",
                    ":(exclude)bench/RESULTS.md")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def command() -> str:
    """The command line that ran this bench, as `.venv/bin/python bench/X.py ARGS`."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return ".venv/bin/python " + shlex.join([str(script), *sys.argv[1:]])


def fenced(text: str) -> str:
    """Printed (fixed-width) text as a markdown code block."""
    return "```\n" + text.strip("\n") + "\n```"


class Capture:
    """Copies what is printed to stdout from now on into a string, still printing it; ``stop()`` returns the text.
    The benches use it to record the readable table they print."""

    def __init__(self) -> None:
        self._stream = sys.stdout
        self._text = io.StringIO()
        sys.stdout = self

    def write(self, s: str) -> int:
        self._text.write(s)
        return self._stream.write(s)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def stop(self) -> str:
        if sys.stdout is self:
            sys.stdout = self._stream
        return self._text.getvalue()


def write(result: dict) -> Path:
    """Write one result's json (keys: name, title, date, commit, command, table, figures, notes)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{result['name']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def record(name: str, title: str, command: str, table: str, figures: dict, notes: str = "") -> Path:
    """Record a bench's current figures as bench/results/<name>.json (dated today, UTC, at the current commit) and
    re-render bench/RESULTS.md. ``table`` is markdown (``fenced(text)`` for printed text). Does nothing but return
    the path when BENCH_NO_RECORD is set."""
    path = RESULTS / f"{name}.json"
    if os.environ.get("BENCH_NO_RECORD"):
        return path
    write({"name": name, "title": title, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
           "commit": commit(), "command": command, "table": table, "figures": figures, "notes": notes})
    render()
    print(f"recorded {path.relative_to(REPO)}; {PAGE.relative_to(REPO)} re-rendered", file=sys.stderr)
    return path


def load() -> dict[str, dict]:
    """Every result json, in section order."""
    found = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    order = [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)
    return {n: found[n] for n in order}


def number(v: float) -> str:
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4g}"


def evaluate(goal: Goal, results: dict[str, dict]) -> tuple[str, str, str]:
    """(value, target, status) cells of one goal; "not measured" when its result or a figure is missing."""
    result = results.get(goal.result)

    def resolve(x):
        if callable(x):
            return x(result["figures"])
        if isinstance(x, str):
            return get(result["figures"], x)
        return x

    def attempt(x) -> float | None:
        try:
            return float(resolve(x))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None

    value, target = (None, None) if result is None else (attempt(goal.value), attempt(goal.target))
    if target is None and not callable(goal.target) and not isinstance(goal.target, str):
        target = float(goal.target)
    target_cell = f"{goal.op} {number(target)}" if target is not None else goal.op
    if value is None or target is None:
        return "-", target_cell, "not measured"
    return number(value), target_cell, "met" if OPS[goal.op](value, target) else "**missed**"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    """Write bench/RESULTS.md from GOALS, bench/results/*.json and bench/FINDINGS.md; returns the text."""
    results = load()
    lines = [
        "# Benchmark results",
        "",
        "The current figures, written by the benches: each bench script records its last run in "
        "`bench/results/<name>.json` (date, commit, command, its printed table, its JSON figures) and re-renders this "
        "page (`.venv/bin/python bench/results.py` does it by hand). Do not edit this page: the goals are `GOALS` in "
        "`bench/results.py`, the findings are `bench/FINDINGS.md`. A measurement replaces the one before it; "
        "`bench/NOTEBOOK.md` keeps the time-ordered history, superseded figures and probes included. Figures are "
        "from the 2-core CPU dev machine without a GPU unless a section says otherwise; a commit marked `+dirty` had "
        "uncommitted changes.",
        "",
        "## Status",
        "",
        "| goal | set by | result | value | target | status | measured | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for goal in GOALS:
        value, target, status = evaluate(goal, results)
        res = results.get(goal.result)
        when = f"{res['date']}, {res['commit']}" if res else "-"
        cmd = f"`{cell(res['command'])}`" if res else "-"
        lines.append(f"| {cell(goal.text)} | {goal.ref or '-'} | `{goal.result}` | {value} | {target} | {status} | "
                     f"{when} | {cmd} |")
    for name, res in results.items():
        lines += ["", f"## {res['title']}",
                  f"`{name}`: measured {res['date']}, commit {res['commit']}: `{res['command']}`", "",
                  res["table"].strip("\n")]
        if res.get("notes"):
            lines += ["", res["notes"].strip("\n")]
    if FINDINGS.is_file():
        lines += ["", FINDINGS.read_text().strip("\n")]
    text = "\n".join(lines) + "\n"
    PAGE.write_text(text)
    return text


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    text = render()
    print(f"{PAGE.relative_to(REPO)}: {len(load())} results, {len(GOALS)} goals, {text.count(chr(10))} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
