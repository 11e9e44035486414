"""Benchmark: forward + backward of the colour + depth asymmetric affinity losses (AsyInst Eq. 11-12).

Compares ``teacher.affinity.asymmetric_affinity_loss`` with a straightforward ``F.unfold`` implementation of the
same maths (the baseline below), on 8 instances at 256x512 with BoxInst colour edges and AsyInst depth edges
built from a synthetic scene. Prints a table and ends with one JSON line:
{"speedup": unfold_time / ours_time, "max_abs_diff": largest |difference| in loss or gradient, ...}; both are
recorded as bench/results/objectives.json (bench/results.py).

Run: .venv/bin/python bench/objectives.py [--repeats 10] [--device cpu] [--threads N]

Current figures: bench/RESULTS.md (2026-11-29, commit not recorded, the quiet 2-core dev machine, default 2 threads:
unfold 961 ms, ours 17.5 ms, 54.9x; results agree to 7e-12 in float32 and 2e-16 in float64).
Most of the gain is from evaluating only each instance's edge region (here ~5% of the image per instance);
the rest from one evaluation per unordered pixel pair and the closed-form gradient.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Run as a script, bench/ is first on sys.path and its scripts (e.g. bench/teacher.py) would shadow the packages.
if sys.path[0] == str(Path(__file__).resolve().parent):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from teacher.affinity import asymmetric_affinity_loss, box_bitmasks, color_edges, depth_edges  # noqa: E402
from teacher.color import image_color_similarity  # noqa: E402
from teacher.config import ObjectiveConfig  # noqa: E402
from bench import results as bench_results  # noqa: E402


def unfold_affinity_loss(mask_logits: torch.Tensor, edges: torch.Tensor, delta: float, gamma: float,
                         dilation: int) -> torch.Tensor:
    """Baseline: materialise the 8 neighbours with F.unfold and let autograd differentiate the chain."""
    n, _, h, w = mask_logits.shape
    nb = F.unfold(mask_logits, kernel_size=3, dilation=dilation, padding=dilation).view(n, 9, h, w)
    nb = torch.cat((nb[:, :4], nb[:, 5:]), 1)
    a, b = mask_logits - delta, nb - delta
    log_p = torch.logaddexp(F.logsigmoid(a) + F.logsigmoid(b), F.logsigmoid(-a) + F.logsigmoid(-b))
    edge_loss = -torch.exp(gamma * (log_p.exp() - 0.5)) * log_p
    weights = edges.to(mask_logits.dtype)
    return (edge_loss * weights).sum() / weights.sum().clamp(min=1.0)


def make_scene(height: int, width: int, n: int, seed: int, device: torch.device):
    """Synthetic image, depth and boxes: a receding ground plane with n curved, textured objects."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    depth = 30.0 - 0.08 * yy
    image = torch.stack((90 + 0.2 * xx, 110 + 0.3 * yy, 130 + 0.1 * (xx + yy)), -1)
    boxes = []
    for k in range(n):
        bh = int(torch.randint(height // 8, height // 3, (1,), generator=g))
        bw = int(torch.randint(width // 12, width // 4, (1,), generator=g))
        y0 = int(torch.randint(0, height - bh, (1,), generator=g))
        x0 = int(torch.randint(0, width - bw, (1,), generator=g))
        cy, cx = y0 + bh / 2, x0 + bw / 2
        inside = ((yy - cy) / (bh / 2)) ** 2 + ((xx - cx) / (bw / 2)) ** 2 <= 1.0
        obj = 5.0 + 2.0 * k + 0.02 * (xx - cx) + 0.3 * (((yy - cy) / bh) ** 2 + ((xx - cx) / bw) ** 2)
        depth = torch.where(inside & (obj < depth), obj, depth)
        colour = torch.rand(3, generator=g, dtype=torch.float64) * 200
        image = torch.where(inside[..., None], colour + 8 * torch.sin(xx / 3)[..., None], image)
        boxes.append((x0, y0, x0 + bw - 1, y0 + bh - 1))
    depth = depth + 0.001 * torch.randn(height, width, generator=g, dtype=torch.float64)
    depth = torch.where(torch.rand(height, width, generator=g) < 0.03, torch.zeros_like(depth), depth)
    image = (image + 3 * torch.randn(height, width, 3, generator=g, dtype=torch.float64)).clamp(0, 255)
    logits = 2.0 * torch.randn(n, 1, height, width, generator=g)
    return (image.to(torch.uint8).to(device), depth.float().to(device),
            torch.tensor(boxes, dtype=torch.float32, device=device), logits.to(device))


def run_loss(fn, logits, edge_sets, cfg: ObjectiveConfig):
    """Colour + depth asymmetric loss, forward + backward; returns (loss, grad)."""
    x = logits.detach().clone().requires_grad_(True)
    (e_col, e_dep) = edge_sets
    loss = (fn(x, e_col, cfg.delta_color, cfg.gamma_color, cfg.pairwise_dilation)
            + fn(x, e_dep, cfg.delta_depth, cfg.gamma_depth, cfg.pairwise_dilation))
    loss.backward()
    return loss.detach(), x.grad


def time_it(fn, logits, edge_sets, cfg, repeats: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(repeats + 1):  # the first call warms up allocators and kernels
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run_loss(fn, logits, edge_sets, cfg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per implementation")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ObjectiveConfig()

    image, depth, boxes, logits = make_scene(args.height, args.width, args.instances, args.seed, device)
    box_masks = box_bitmasks(boxes, args.height, args.width)[:, None]
    sim = image_color_similarity(image, stride=1, theta=cfg.color_theta, dilation=cfg.pairwise_dilation)
    edge_sets = (color_edges(sim, box_masks, cfg.color_thresh),
                 depth_edges(depth, box_masks, cfg.depth_thresh, cfg.pairwise_dilation))

    rows, results = [], {}
    for name, fn in (("unfold", unfold_affinity_loss), ("ours", asymmetric_affinity_loss)):
        times = time_it(fn, logits, edge_sets, cfg, args.repeats, device)
        results[name] = statistics.median(times)
        rows.append((name, statistics.median(times), min(times)))

    max_diff = {}
    for dtype in (torch.float32, torch.float64):
        ref_loss, ref_grad = run_loss(unfold_affinity_loss, logits.to(dtype), edge_sets, cfg)
        loss, grad = run_loss(asymmetric_affinity_loss, logits.to(dtype), edge_sets, cfg)
        max_diff[str(dtype).removeprefix("torch.")] = max((loss - ref_loss).abs().item(),
                                                          (grad - ref_grad).abs().max().item())
    speedup = results["unfold"] / results["ours"]

    n_col, n_dep = (int(e.sum()) for e in edge_sets)
    printed = bench_results.Capture()
    print(f"colour + depth asymmetric affinity loss, forward + backward, {args.instances} instances at "
          f"{args.height}x{args.width}, {device}, {torch.get_num_threads()} threads")
    print(f"edges: colour {n_col}, depth {n_dep}; loss {loss.item():.6f}")
    print(f"{'implementation':<16}{'median ms':>12}{'min ms':>12}")
    for name, med, best in rows:
        print(f"{name:<16}{1e3 * med:>12.2f}{1e3 * best:>12.2f}")
    print(f"speedup (unfold / ours, median): {speedup:.2f}x; max |diff| float32 {max_diff['float32']:.3g}, "
          f"float64 {max_diff['float64']:.3g}")
    out = {"speedup": round(speedup, 3), "max_abs_diff": max_diff["float32"],
           "max_abs_diff_float64": max_diff["float64"], "ours_ms": round(1e3 * results["ours"], 3),
           "unfold_ms": round(1e3 * results["unfold"], 3), "device": str(device),
           "threads": torch.get_num_threads(), "instances": args.instances, "size": [args.height, args.width]}
    table = printed.stop()
    print(json.dumps(out))
    bench_results.record("objectives", "Asymmetric affinity loss against `F.unfold` (`bench/objectives.py`)",
                         bench_results.command(), bench_results.fenced(table), out)


if __name__ == "__main__":
    main()
