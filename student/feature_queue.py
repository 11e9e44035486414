"""The student's feature queue for the dense contrastive loss: the latest RoI embedding of recently seen
instances, keyed by (image_id, instance_id), first in first out.

A shard's correspondences name partner instances of other images; the partner's features come from here (stored
detached, in the image's unflipped orientation), so a row whose partner has not been seen recently adds nothing.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class FeatureQueue:
    """At most ``capacity`` entries of (C, G) features (G = g * g cells, row-major)."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"FeatureQueue: capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._staged: list[tuple[tuple[str, int], torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._items

    def get(self, key: tuple[str, int]) -> torch.Tensor | None:
        return self._items.get(key)

    def push(self, key: tuple[str, int], features: torch.Tensor) -> None:
        """Store (C, G) features for ``key`` (replacing an older entry, which then counts as newest)."""
        if self.capacity == 0:
            return
        self._items.pop(key, None)
        self._items[key] = features.detach()
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def stage(self, key: tuple[str, int], features: torch.Tensor) -> None:
        """Hold (C, G) features for ``key`` until ``commit`` (a training step's features enter the queue only once
        the step is taken; ``get`` does not see them before)."""
        self._staged.append((key, features.detach()))

    def commit(self) -> None:
        """``push`` the staged features, in the order they were staged."""
        staged, self._staged = self._staged, []
        for key, features in staged:
            self.push(key, features)

    def clear(self) -> None:
        self._items.clear()
        self._staged.clear()

    def state_dict(self) -> dict:
        """Oldest first, as plain lists and one stacked tensor (loads with ``weights_only=True``)."""
        keys = list(self._items)
        return {"keys": [[k[0], int(k[1])] for k in keys],
                "features": torch.stack([self._items[k] for k in keys]) if keys else torch.zeros(0)}

    def load_state_dict(self, state: dict) -> None:
        self.clear()
        for key, features in zip(state["keys"], state["features"]):
            self.push((str(key[0]), int(key[1])), features)
