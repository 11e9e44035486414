"""Benchmark of the teacher's kernels (issue 4).

(a) Soft mean-field: 10 iterations (sweeps; each pixel updated once per sweep) over 64 RoIs of 64x64, 2 labels,
    8 neighbours (3x3, dilation 1), float32, fg allowed in a box covering the middle of each RoI, no early stop.
    `meanfield_sweeps_reference` (PyTorch: four whole-map message passes and softmaxes per sweep) against the fused
    C++/OpenMP kernel (`kernels.meanfield`), and on a GPU the reference on CUDA tensors (CUDA message passing).
    Bytes moved: what one iteration must touch if nothing stayed in cache (read theta, kernel and Q, write Q:
    14 float planes per RoI), per second, against the copy bandwidth of a 256 MiB tensor copy in the same run.
    The message-passing kernel alone (10 calls, reference vs C++ and CUDA) is timed as well: it is the part that
    is memory bound.
(b) Sinkhorn: 10 pairs of 784x784 (28x28 grids), cost = (1 - cosine similarity of random features) / 2 in [0,1],
    epsilon 0.05 (DiscoBox's reg), random positive marginals. POT's `ot.sinkhorn` (sinkhorn_knopp, float64 numpy,
    one pair at a time) runs to stopThr; then ours runs to the largest marginal violation POT achieved on any pair
    (||T1-a||_1 + ||T^T1-b||_1, measured on POT's plans), so ours is at least as accurate on every pair. Ours runs
    in float32 (the teacher's dtype; `sinkhorn_speedup_vs_pot`) and in float64 (`..._float64`).

Prints a table; the last line is one JSON object. Both are recorded as bench/results/kernels.json (bench/results.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# This script shares its name with the package it measures: keep its own folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kernels import extension  # noqa: E402
from kernels.meanfield import meanfield_sweeps, meanfield_sweeps_reference  # noqa: E402
from kernels.message_passing import message_passing, neighbour_offsets  # noqa: E402
from kernels.sinkhorn import sinkhorn  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1]))  # the repository, after the packages: for bench.results
from bench import results as bench_results  # noqa: E402


def best_time(fn, repeats: int, sync=lambda: None) -> float:
    """Minimum wall time of fn() over `repeats` runs after one warm-up (the machine is shared; min is the least
    noisy estimate)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth(device: torch.device, repeats: int, sync) -> float:
    """Bytes per second (read + write) of a 256 MiB tensor copy."""
    src = torch.ones(64 * 2**20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), repeats, sync)
    return 2 * src.numel() * src.element_size() / t


def meanfield_problem(device: torch.device, seed: int = 0):
    """theta (64,2,64,64), kernel (64,8,64,64) and fg_allowed (64,1,64,64), float32 on `device`."""
    g = torch.Generator().manual_seed(seed)
    B, H, W = 64, 64, 64
    theta = -torch.log_softmax(torch.randn(B, 2, H, W, generator=g), 1)
    kernel = torch.rand(B, 8, H, W, generator=g)
    allowed = torch.zeros(B, 1, H, W, dtype=torch.bool)
    allowed[:, :, 8:56, 6:58] = True
    return theta.to(device), kernel.to(device), allowed.to(device)


ITERS = 10


def message_passes(q, kernel, backend: str):
    offsets = neighbour_offsets(3, 1)
    for _ in range(ITERS):
        out = message_passing(q, kernel, offsets, backend=backend)
    return out


def bench_meanfield(device: torch.device, repeats: int, sync) -> dict:
    """Times of the reference and fast mean-field and message passing on `device`, with their differences."""
    theta, kernel, allowed = meanfield_problem(device)
    B, _, H, W = theta.shape
    plane = B * H * W * theta.element_size()
    q0 = torch.softmax(-theta, 1)
    fast = "cpu" if device.type == "cpu" else "cuda"

    def reference():
        return meanfield_sweeps_reference(theta, kernel, allowed, 1, ITERS, 0.0, backend="reference")

    def fused():
        return meanfield_sweeps(theta, kernel, allowed, 1, ITERS, 0.0, backend="auto")

    ref_q, fast_q = reference(), fused()
    out = {
        "mf_ref_s": best_time(reference, repeats, sync),
        "mf_fast_s": best_time(fused, repeats, sync),
        "mf_max_diff": float((fast_q - ref_q).abs().max()),
        "mp_ref_s": best_time(lambda: message_passes(q0, kernel, "reference"), repeats, sync),
        "mp_fast_s": best_time(lambda: message_passes(q0, kernel, fast), repeats, sync),
        "mp_max_diff": float((message_passes(q0, kernel, fast) - message_passes(q0, kernel, "reference")).abs().max()),
        "mf_bytes": ITERS * 14 * plane,  # per iteration: read theta (2), kernel (8), Q (2); write Q (2)
        "mp_bytes": ITERS * 12 * plane,  # per call: read Q (2) and kernel (8), write the messages (2)
        "fast_name": "C++/OpenMP fused" if device.type == "cpu" else "CUDA message passing",
    }
    return out


def sinkhorn_problem(seed: int = 0, pairs: int = 10, grid: int = 28, channels: int = 8):
    g = torch.Generator().manual_seed(seed)
    n = grid * grid
    f0 = torch.nn.functional.normalize(torch.randn(pairs, n, channels, generator=g, dtype=torch.float64), dim=-1)
    f1 = torch.nn.functional.normalize(
        f0 + 0.3 * torch.randn(pairs, n, channels, generator=g, dtype=torch.float64), dim=-1
    )
    cost = (1 - f0 @ f1.transpose(1, 2)) / 2
    a = torch.rand(pairs, n, generator=g, dtype=torch.float64) + 0.3
    b = torch.rand(pairs, n, generator=g, dtype=torch.float64) + 0.3
    return cost, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


MAX_ITER = 20000


def violation(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (plan.sum(-1) - a).abs().sum(-1) + (plan.sum(-2) - b).abs().sum(-1)


def bench_sinkhorn(eps: float, stop_thr: float, devices: list[torch.device], repeats: int) -> dict:
    import ot

    cost, a, b = sinkhorn_problem()
    cost_np, a_np, b_np = cost.numpy(), a.numpy(), b.numpy()

    def run_pot():
        return [
            ot.sinkhorn(a_np[k], b_np[k], cost_np[k], eps, numItermax=100000, stopThr=stop_thr, log=True)
            for k in range(cost.shape[0])
        ]

    pot = run_pot()
    pot_plans = torch.from_numpy(np.stack([p for p, _ in pot]))
    pot_err = violation(pot_plans, a, b)
    pot_iters = [len(log["err"]) * 10 for _, log in pot]  # POT logs its error every 10 iterations
    t_pot = best_time(run_pot, max(1, repeats // 2))
    tol = float(pot_err.max())
    result = {
        "epsilon": eps, "pot_stopThr": stop_thr, "tol": tol, "pot_s": t_pot, "pot_err_max": tol,
        "pot_iters_approx": int(np.mean(pot_iters)), "ours": {},
    }
    for device in devices:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for dtype in (torch.float64, torch.float32):
            C, A, Bm = (t.to(device=device, dtype=dtype) for t in (cost, a, b))
            res = sinkhorn(C, A, Bm, eps, tol=tol, max_iter=MAX_ITER)
            t = best_time(lambda: sinkhorn(C, A, Bm, eps, tol=tol, max_iter=MAX_ITER), repeats, sync)
            err = violation(res.plan.double().cpu(), a, b)
            rel = float(((res.plan.double().cpu() - pot_plans).abs().sum((1, 2))).max())
            result["ours"][f"{device.type}-{str(dtype).removeprefix('torch.')}"] = {
                "s": t, "speedup": t_pot / t, "err_max": float(err.max()), "iters_mean": float(res.iters.double().mean()),
                "plan_l1_vs_pot": rel,
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (the minimum is reported)")
    parser.add_argument("--epsilon", type=float, default=0.05, help="Sinkhorn epsilon (cost in [0,1])")
    parser.add_argument("--stop-thr", type=float, default=1e-5, help="POT stopThr (L2 norm of the column violation)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; use 1 on an oversubscribed machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = torch.cuda.is_available()
    printed = bench_results.Capture()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name()}" if cuda else ", no GPU"))
    if extension.load_cpu() is None or extension.load_meanfield_cpu() is None:
        print("WARNING: a C++ extension could not be built; some 'fast' CPU figures are the reference's")

    summary: dict = {}
    cpu = torch.device("cpu")
    results = {"cpu": bench_meanfield(cpu, args.repeats, lambda: None)}
    bandwidth = {"cpu": copy_bandwidth(cpu, args.repeats, lambda: None)}
    if cuda:
        dev = torch.device("cuda")
        results["cuda"] = bench_meanfield(dev, args.repeats, torch.cuda.synchronize)
        bandwidth["cuda"] = copy_bandwidth(dev, args.repeats, torch.cuda.synchronize)
    for device, r in results.items():
        prefix = "" if device == "cpu" else "gpu_"
        summary[prefix + "meanfield_speedup"] = r["mf_ref_s"] / r["mf_fast_s"]
        summary[prefix + "bandwidth_fraction"] = r["mf_bytes"] / r["mf_fast_s"] / bandwidth[device]
        summary[prefix + "message_passing_speedup"] = r["mp_ref_s"] / r["mp_fast_s"]
        summary[prefix + "message_passing_bandwidth_fraction"] = r["mp_bytes"] / r["mp_fast_s"] / bandwidth[device]
        summary[prefix + "copy_bandwidth_gb_s"] = bandwidth[device] / 1e9

    print(f"\n(a) soft mean-field, {ITERS} iterations, 64 RoIs x 2 labels x 64x64, 8 neighbours, float32")
    print(f"    {'device':<6} {'what':<16} {'reference (ms)':>14} {'fast (ms)':>10} {'speed-up':>9} "
          f"{'fast GB/s':>9} {'% of copy':>9} {'max |diff|':>10}  fast = ")
    for device, r in results.items():
        for what, key, name in (("mean-field", "mf", r["fast_name"]), ("msg-pass only", "mp", "kernel alone")):
            gbs = r[f"{key}_bytes"] / r[f"{key}_fast_s"] / 1e9
            print(f"    {device:<6} {what:<16} {r[f'{key}_ref_s'] * 1e3:14.2f} {r[f'{key}_fast_s'] * 1e3:10.2f} "
                  f"{r[f'{key}_ref_s'] / r[f'{key}_fast_s']:8.1f}x {gbs:9.2f} "
                  f"{100 * gbs * 1e9 / bandwidth[device]:8.0f}% {r[f'{key}_max_diff']:10.2e}  {name}")
        print(f"    {device} copy bandwidth (256 MiB tensor copy, read + write): {bandwidth[device] / 1e9:.1f} GB/s")
    print("    (bytes = what the iterations touch if nothing stayed in cache; a 64x64 RoI fits in L2, so the fused")
    print("    kernel's figure is an effective bandwidth and can exceed the copy bandwidth)")

    sk = bench_sinkhorn(args.epsilon, args.stop_thr, [cpu] + ([torch.device("cuda")] if cuda else []), args.repeats)
    print(f"\n(b) Sinkhorn, 10 pairs of 784x784, epsilon {sk['epsilon']}, cost in [0,1]")
    print(f"    POT ot.sinkhorn (float64, stopThr {sk['pot_stopThr']:g}): {sk['pot_s'] * 1e3:.0f} ms, "
          f"~{sk['pot_iters_approx']} iterations/pair, worst marginal violation {sk['pot_err_max']:.2e}")
    print(f"    ours to tol = {sk['tol']:.2e}:")
    print(f"    {'run':<16} {'time (ms)':>10} {'speed-up':>9} {'worst err':>10} {'mean iters':>10} {'|T-T_pot|_1':>11}")
    for name, r in sk["ours"].items():
        print(f"    {name:<16} {r['s'] * 1e3:10.1f} {r['speedup']:8.1f}x {r['err_max']:10.2e} "
              f"{r['iters_mean']:10.1f} {r['plan_l1_vs_pot']:11.2e}")
    # The headline is float32, the dtype the teacher's correspondence runs in; float64 reads twice the bytes.
    summary["sinkhorn_speedup_vs_pot"] = sk["ours"]["cpu-float32"]["speedup"]
    summary["sinkhorn_speedup_vs_pot_float64"] = sk["ours"]["cpu-float64"]["speedup"]
    summary["sinkhorn_epsilon"] = sk["epsilon"]
    summary["sinkhorn_tol"] = sk["tol"]
    if cuda:
        summary["gpu_sinkhorn_speedup_vs_pot"] = sk["ours"]["cuda-float32"]["speedup"]
    out = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in summary.items()}
    table = printed.stop()
    print(json.dumps(out))
    bench_results.record("kernels", "Kernels: soft mean-field and Sinkhorn (`bench/kernels.py`)",
                         bench_results.command(), bench_results.fenced(table), out,
                         "Goals: mean-field >= 5x the PyTorch reference at >= 30 % of the copy bandwidth; Sinkhorn "
                         ">= 3x POT (float32) at least as accurate. Each time is the minimum over --repeats runs.")


if __name__ == "__main__":
    main()
