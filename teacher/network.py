"""Teacher networks: the protocol the structured teacher's network mode calls, and a registry of them by name.

A checkpoint names its network (``{"network": <name>, ...}``). The package that defines a network registers a
builder for that name (``register_network``); whoever loads a checkpoint looks the name up (``build_network``).
The registry lives here, in the lowest layer that needs it, so the student can register its adapter without
importing the pipeline, and the pipeline can build networks without knowing the student's internals.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

if TYPE_CHECKING:   # annotations only: the registry loads without torch (a light driver process)
    import torch


@runtime_checkable
class TeacherNetwork(Protocol):
    """What ``StructuredTeacher`` needs of a network.

    ``classes``: the dataset category ids the network predicts masks for. Calling it::

        network(images, boxes, classes) -> [(mask_probs, features), ...]

    images: list of (3,H_i,W_i) float32 RGB in [0, 1]; boxes: list of (N_i,4) float32 x1,y1,x2,y2 pixels of each
    image; classes: list of (N_i,) int64 category ids (each in ``classes``). All on the teacher's device. Per image:
    mask_probs (N_i,G,G) probabilities of the box's class on a G x G grid that spans exactly the box (cell (i, j)
    centred at (x1 + (j + 0.5) w / G, y1 + (i + 0.5) h / G)), and features (N_i,C,g,g) RoI features for the
    correspondence, over the box grown by the teacher's ``box_prior.pad`` on each side. The teacher calls
    ``eval()`` once and every call under ``torch.no_grad()``.
    """

    classes: list[int]

    def __call__(self, images: list[torch.Tensor], boxes: list[torch.Tensor],
                 classes: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]: ...

    def eval(self) -> Any: ...

    def to(self, device: torch.device | str) -> Any: ...


class UnknownNetwork(KeyError):
    """A checkpoint names a network no package registered; the message lists the known ones."""

    def __init__(self, name: Any):
        self.name = name
        known = ", ".join(known_networks()) or "none registered"
        super().__init__(f"unknown network {name!r} (known networks: {known})")

    def __str__(self) -> str:
        return str(self.args[0])


_BUILDERS: dict[str, Callable[[dict, str], TeacherNetwork]] = {}


def register_network(name: str, builder: Callable[[dict, str], TeacherNetwork]) -> None:
    """Make checkpoints that name ``name`` buildable: ``builder(checkpoint dict, where) -> TeacherNetwork`` on the
    CPU, ``where`` naming the checkpoint in the builder's errors.

    Registering the same builder again is a no-op (modules may be imported twice); another builder under a taken
    name is an error, so two packages cannot silently shadow each other.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_network: name must be a non-empty string, got {name!r}")
    current = _BUILDERS.get(name)
    if current is not None and current is not builder:
        raise ValueError(f"register_network: {name!r} is already registered to {current!r}")
    _BUILDERS[name] = builder


def known_networks() -> list[str]:
    """Registered network names, sorted."""
    return sorted(_BUILDERS)


def build_network(checkpoint: dict, where: str = "checkpoint") -> TeacherNetwork:
    """The network a loaded checkpoint describes (``checkpoint["network"]`` names its builder), on the CPU.

    Raises ``UnknownNetwork`` for a missing or unregistered name; the builder's own errors (weights that do not
    fit, a tampered file) pass through.
    """
    name = checkpoint.get("network") if isinstance(checkpoint, dict) else None
    if name not in _BUILDERS:
        raise UnknownNetwork(name)
    network = _BUILDERS[name](checkpoint, where)
    if not isinstance(network, TeacherNetwork):
        raise TypeError(f"network builder {name!r} returned {type(network).__name__}, which lacks "
                        f"classes / __call__ / eval / to")
    return network
