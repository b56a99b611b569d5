"""A byte-budget cache for frozen, deterministic computations that training repeats every epoch
(the VAE encoding of a crop, the UNet features of a stored latent): each key is computed once and
kept while the budget lasts; past it, later keys are simply recomputed. Nothing is evicted, so a
key once cached never costs a recomputation."""
from __future__ import annotations

from typing import Callable, Union

import torch

Value = Union[torch.Tensor, list[torch.Tensor]]


class ByteBudgetCache:
    def __init__(self, max_mb: float):
        self.room = int(max_mb * 2**20)
        self._items: dict[str, Value] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, keys: list[str], compute: Callable[[list[int]], list[Value]]) -> list[Value]:
        """The value of each key; `compute(indices)` gives those of keys[i] for the indices not
        cached, in that order."""
        miss = [i for i, k in enumerate(keys) if k not in self._items]
        new = dict(zip([keys[i] for i in miss], compute(miss))) if miss else {}
        out = [new[k] if k in new else self._items[k] for k in keys]
        for k, value in new.items():
            tensors = value if isinstance(value, list) else [value]
            size = sum(t.numel() * t.element_size() for t in tensors)
            if size <= self.room:
                # Clones: a view would keep the whole batch it was cut from alive.
                self._items[k] = [t.clone() for t in value] if isinstance(value, list) else value.clone()
                self.room -= size
        return out
