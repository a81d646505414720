"""ddim_fast's Triton kernels, one file per kernel with its launcher (imported on first use, see
``ddim_fast._library.triton_module``). What the launchers share lives here."""

from __future__ import annotations

from typing import Callable, Hashable, TypeVar

_T = TypeVar("_T")


class PlanCache(dict):
    """Launch plans by key (shapes, strides, dtype, options: everything a plan follows from), bounded: past
    ``limit`` entries it starts over (a sampling loop uses one or two keys, a UNet a few dozen)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def get_or_make(self, key: Hashable, make: Callable[[], _T]) -> _T:
        plan = self.get(key)
        if plan is None:
            if len(self) >= self.limit:
                self.clear()
            plan = self[key] = make()
        return plan
