"""Soft mean-field sweeps of a two-label CRF with a dilated 8-neighbourhood Potts kernel.

Given unary energies theta [bg, fg], pairwise weights w_k (one plane per offset of `neighbour_offsets(3, d)`) and
the pixels where fg is allowed, each pixel's marginal is updated to

    Q_i = softmax_l( sum_k w_k(i) Q_{i + d_k}(l) - theta_i(l) )      (Q_i(fg) = 0 where fg is not allowed)

starting from Q = softmax(-theta). The pixels are updated in four colour classes ((y // d) % 2, (x // d) % 2)
in turn: no two pixels of a class are neighbours, so each class update is exact block-coordinate descent on the
mean-field free energy (see `teacher.crf`). One sweep = the four classes; a RoI stops after the first sweep in
which none of its marginals moved more than `tol`, or after `iters` sweeps. Convergence is decided per RoI, so a
RoI's result does not depend on the other RoIs of the batch.

Two implementations of the same maths behind `meanfield_sweeps`:
- `meanfield_sweeps_reference`: PyTorch, each class update one `message_passing` call over the whole map (any
  device; it uses the message-passing backend it is given, so CUDA tensors get the CUDA kernel).
- the fused C++/OpenMP extension (`kernels/csrc/meanfield_cpu.cpp`): all sweeps of one RoI in one pass while its
  working set sits in cache, RoIs in parallel; CPU only. When it cannot be built, one warning is issued and the
  reference runs.
Neither is differentiable: the CRF runs without gradients.
"""

from __future__ import annotations

import torch

from kernels import extension
from kernels.message_passing import BACKENDS, message_passing, neighbour_offsets

NUM_OFFSETS = 8  # the dilated 8-neighbourhood, neighbour_offsets(3, dilation)


def colour_classes(h: int, w: int, dilation: int, device: torch.device) -> list[torch.Tensor]:
    """Four (h,w) bool masks ((y // d) % 2, (x // d) % 2) = (0,0), (0,1), (1,0), (1,1): no two dilated
    8-neighbours share a class."""
    ys = (torch.arange(h, device=device) // dilation) % 2
    xs = (torch.arange(w, device=device) // dilation) % 2
    cls = ys[:, None] * 2 + xs[None, :]
    return [cls == c for c in range(4)]


def masked_softmax(logits: torch.Tensor, fg_allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the label axis of (N,2,h,w) logits [bg, fg] with the fg logit -inf where fg_allowed (N,1,h,w)
    bool is False."""
    fg = torch.where(fg_allowed, logits[:, 1:], torch.full_like(logits[:, 1:], float("-inf")))
    return torch.softmax(torch.cat([logits[:, :1], fg], 1), dim=1)


def _check_inputs(theta, kernel, fg_allowed, dilation, iters, tol, backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"meanfield_sweeps: backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(theta, torch.Tensor) or theta.dim() != 4 or theta.shape[1] != 2:
        raise ValueError(f"meanfield_sweeps: theta must be a (N,2,h,w) tensor, got shape {getattr(theta, 'shape', None)}")
    n, _, h, w = theta.shape
    if theta.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"meanfield_sweeps: theta must be float32 or float64, got {theta.dtype}")
    if (
        not isinstance(kernel, torch.Tensor)
        or kernel.dim() != 4
        or kernel.shape[0] not in (1, n)
        or kernel.shape[1:] != (NUM_OFFSETS, h, w)
    ):
        raise ValueError(
            f"meanfield_sweeps: kernel must be ({n} or 1, {NUM_OFFSETS}, {h}, {w}), got shape "
            f"{tuple(getattr(kernel, 'shape', ()))}"
        )
    if kernel.dtype != theta.dtype:
        raise ValueError(f"meanfield_sweeps: kernel dtype {kernel.dtype} differs from theta's {theta.dtype}")
    if not isinstance(fg_allowed, torch.Tensor) or fg_allowed.dtype != torch.bool or fg_allowed.shape != (n, 1, h, w):
        raise ValueError(
            f"meanfield_sweeps: fg_allowed must be a ({n},1,{h},{w}) bool tensor, got "
            f"{getattr(fg_allowed, 'dtype', None)} {tuple(getattr(fg_allowed, 'shape', ()))}"
        )
    if kernel.device != theta.device or fg_allowed.device != theta.device:
        raise ValueError(
            f"meanfield_sweeps: theta, kernel and fg_allowed must share a device, got {theta.device}, "
            f"{kernel.device}, {fg_allowed.device}"
        )
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"meanfield_sweeps: dilation must be a positive int, got {dilation!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"meanfield_sweeps: iters must be an int >= 0, got {iters!r}")
    if not tol >= 0:
        raise ValueError(f"meanfield_sweeps: tol must be >= 0, got {tol!r}")


def meanfield_sweeps_reference(
    theta: torch.Tensor,
    kernel: torch.Tensor,
    fg_allowed: torch.Tensor,
    dilation: int,
    iters: int,
    tol: float,
    backend: str = "reference",
) -> torch.Tensor:
    """The sweeps in PyTorch (arguments as `meanfield_sweeps`; `backend` is the message-passing backend)."""
    n, _, h, w = theta.shape
    offsets = neighbour_offsets(3, dilation)
    classes = colour_classes(h, w, dilation, theta.device)
    with torch.no_grad():
        q = masked_softmax(-theta, fg_allowed)
        active = torch.ones(n, 1, 1, 1, dtype=torch.bool, device=theta.device)
        for _ in range(iters):
            prev = q
            for cls in classes:
                msg = message_passing(q, kernel, offsets, backend=backend)
                q = torch.where(cls & active, masked_softmax(msg - theta, fg_allowed), q)
            active = active & ((q - prev).abs().amax((1, 2, 3), keepdim=True) > tol)
            if not bool(active.any()):
                break
    return q


def meanfield_sweeps(
    theta: torch.Tensor,
    kernel: torch.Tensor,
    fg_allowed: torch.Tensor,
    dilation: int = 1,
    iters: int = 10,
    tol: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Soft mean-field marginals after up to `iters` sweeps (maths and schedule: module docstring).

    theta (N,2,h,w) float32/float64 unary energies [bg, fg]; kernel (N,8,h,w) or (1,8,h,w) (broadcast over N),
    theta's dtype and device, the weights towards the offsets `neighbour_offsets(3, dilation)` in that order
    (neighbours outside the image contribute nothing whatever their weight); fg_allowed (N,1,h,w) bool.
    Returns Q (N,2,h,w) of theta's dtype, rows summing to 1, Q[:, 1] exactly 0 where fg is not allowed.
    backend: "auto" and "cpu" run the fused C++ extension on CPU tensors (the reference when it cannot be built);
    otherwise the reference runs with that message-passing backend ("auto" on CUDA tensors = the CUDA kernel).
    No autograd: the result never requires gradients.
    """
    _check_inputs(theta, kernel, fg_allowed, dilation, iters, tol, backend)
    if theta.device.type == "cpu" and backend in ("auto", "cpu"):
        module = extension.load_meanfield_cpu()
        if module is not None:
            q, _ = module.meanfield_sweeps(
                theta.detach().contiguous(),
                kernel.detach().contiguous(),
                fg_allowed.reshape(fg_allowed.shape[0], *fg_allowed.shape[2:]).to(torch.uint8).contiguous(),
                dilation,
                iters,
                float(tol),
                torch.get_num_threads(),
            )
            return q
    return meanfield_sweeps_reference(theta, kernel, fg_allowed, dilation, iters, tol, backend)
