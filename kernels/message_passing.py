"""Mean-field message passing: per pixel, the kernel-weighted sum of the neighbours' label terms.

    out[b, l, y, x] = sum_k kernel[b, k, y, x] * q[b, l, y + dy_k, x + dx_k]      (q = 0 outside the image)

Three backends compute the same thing behind `message_passing`:
- "reference": PyTorch on shifted slices; any device; differentiable (autograd through q and kernel).
- "cpu": the C++/OpenMP extension (`kernels/csrc/message_passing_cpu.cpp`), built on first use. Not differentiable:
  the CRF runs without gradients. When the extension cannot be built, one warning is issued and the reference runs.
- "cuda": the CUDA extension (`kernels/csrc/message_passing_cuda.cu`), one thread per output pixel; not differentiable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels import extension

BACKENDS = ("auto", "reference", "cpu", "cuda")
MAX_CUDA_OFFSETS = 64  # kMaxOffsets in csrc/message_passing_cuda.cu


def neighbour_offsets(size: int = 3, dilation: int = 1, centre: bool = False) -> tuple[tuple[int, int], ...]:
    """The (dy, dx) offsets of a size x size window with the given dilation, in `F.unfold` order (row-major).

    The centre (0, 0) is left out unless `centre` is True; size=3 without centre gives the 8-neighbourhood that
    BoxInst/AsyInst use, size=3 with centre the 9 offsets of DiscoBox's `MeanField`.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"neighbour_offsets: size must be a positive odd int, got {size!r}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"neighbour_offsets: dilation must be a positive int, got {dilation!r}")
    r = size // 2
    return tuple(
        (dy * dilation, dx * dilation)
        for dy in range(-r, r + 1)
        for dx in range(-r, r + 1)
        if centre or (dy, dx) != (0, 0)
    )


def _check_inputs(q: torch.Tensor, kernel: torch.Tensor, offsets: Sequence[tuple[int, int]], backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"message_passing: backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"message_passing: q must be a (B,L,H,W) tensor, got shape {getattr(q, 'shape', None)}")
    if not isinstance(kernel, torch.Tensor) or kernel.dim() != 4:
        raise ValueError(
            f"message_passing: kernel must be a (B|1,K,H,W) tensor, got shape {getattr(kernel, 'shape', None)}"
        )
    B, _, H, W = q.shape
    if kernel.shape[0] not in (1, B) or kernel.shape[2:] != (H, W):
        raise ValueError(
            f"message_passing: kernel shape {tuple(kernel.shape)} does not fit q shape {tuple(q.shape)} "
            f"(expected ({B} or 1, K, {H}, {W}))"
        )
    if kernel.shape[1] != len(offsets):
        raise ValueError(f"message_passing: kernel has {kernel.shape[1]} channels but {len(offsets)} offsets given")
    if any(len(o) != 2 for o in offsets):
        raise ValueError(f"message_passing: offsets must be (dy, dx) pairs, got {list(offsets)!r}")
    if q.dtype not in (torch.float32, torch.float64) or kernel.dtype != q.dtype:
        raise ValueError(
            f"message_passing: q and kernel must share a float32/float64 dtype, got {q.dtype} and {kernel.dtype}"
        )
    if q.device != kernel.device:
        raise ValueError(f"message_passing: q is on {q.device} but kernel is on {kernel.device}")
    if backend == "cpu" and q.device.type != "cpu":
        raise ValueError(f"message_passing: backend 'cpu' needs CPU tensors, got {q.device}")
    if backend == "cuda" and q.device.type != "cuda":
        raise ValueError(f"message_passing: backend 'cuda' needs CUDA tensors, got {q.device}")
    if len(offsets) > MAX_CUDA_OFFSETS and q.device.type == "cuda" and backend != "reference":
        raise ValueError(
            f"message_passing: the CUDA backend takes at most {MAX_CUDA_OFFSETS} offsets, got {len(offsets)}"
        )


def _valid_range(d: int, n: int) -> tuple[int, int]:
    """Output index range [lo, hi) whose neighbour at offset d lies inside [0, n); empty when |d| >= n."""
    return max(0, -d), max(max(0, -d), min(n, n - d))


def message_passing_reference(
    q: torch.Tensor, kernel: torch.Tensor, offsets: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """PyTorch message passing on shifted slices (no unfold, no padded copy); differentiable.

    q (B,L,H,W), kernel (B|1,K,H,W) of q's dtype, offsets K (dy, dx) pairs -> (B,L,H,W).
    """
    _, _, H, W = q.shape
    out = q.new_zeros(q.shape)
    for k, (dy, dx) in enumerate(offsets):
        y0, y1 = _valid_range(dy, H)
        x0, x1 = _valid_range(dx, W)
        if y0 == y1 or x0 == x1:
            continue
        out[:, :, y0:y1, x0:x1] += kernel[:, k : k + 1, y0:y1, x0:x1] * q[:, :, y0 + dy : y1 + dy, x0 + dx : x1 + dx]
    return out


def _offsets_tensor(offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(K,2) int64 CPU tensor; the extensions read it on the host."""
    return torch.tensor([[int(dy), int(dx)] for dy, dx in offsets], dtype=torch.int64).reshape(-1, 2)


def message_passing(
    q: torch.Tensor,
    kernel: torch.Tensor,
    offsets: Sequence[tuple[int, int]],
    backend: str = "auto",
) -> torch.Tensor:
    """out[b,l,y,x] = sum_k kernel[b,k,y,x] * q[b,l,y+dy_k,x+dx_k], zero outside the image.

    q (B,L,H,W) float32/float64; kernel (B,K,H,W) or (1,K,H,W) (broadcast over B), same dtype and device;
    offsets: K (dy, dx) pairs, e.g. from `neighbour_offsets`. Returns (B,L,H,W) of q's dtype.
    backend "auto" picks "cuda" for CUDA tensors, "cpu" for CPU tensors, except that tensors needing gradients
    go to "reference" (the only differentiable backend).
    """
    _check_inputs(q, kernel, offsets, backend)
    if backend == "auto":
        if torch.is_grad_enabled() and (q.requires_grad or kernel.requires_grad):
            backend = "reference"
        else:
            backend = "cuda" if q.device.type == "cuda" else "cpu" if q.device.type == "cpu" else "reference"
    if backend == "reference":
        return message_passing_reference(q, kernel, offsets)
    if torch.is_grad_enabled() and (q.requires_grad or kernel.requires_grad):
        raise ValueError(
            f"message_passing: backend {backend!r} is not differentiable; use 'reference' or 'auto' for tensors "
            "that need gradients, or run under torch.no_grad()"
        )
    module = extension.load_cuda() if backend == "cuda" else extension.load_cpu()
    if module is None:
        return message_passing_reference(q, kernel, offsets)
    q_c = q.contiguous()
    k_c = kernel.contiguous()
    offs = _offsets_tensor(offsets)
    if backend == "cuda":
        return module.message_passing(q_c, k_c, offs)
    return module.message_passing(q_c, k_c, offs, torch.get_num_threads())
