"""Deterministic fault selection and counters.

Each :class:`~server.sim.config.FaultSpec` keeps its own seeded random stream
and event counter, so which requests get a fault depends only on the seed and
on the order in which eligible requests arrive.
"""

from __future__ import annotations

import random
from collections import Counter

from server.sim.config import STREAM_ONLY_FAULTS, FaultSpec

__all__ = ["FaultPlan"]


class _Trigger:
    __slots__ = ("spec", "rng", "seen", "injected")

    def __init__(self, spec: FaultSpec, seed: int, index: int) -> None:
        self.spec = spec
        self.rng = random.Random(f"{seed}:{index}:{spec.kind}")
        self.seen = 0
        self.injected = 0

    def fire(self) -> bool:
        spec = self.spec
        if spec.count is not None and self.injected >= spec.count:
            return False
        self.seen += 1
        if spec.every_nth is not None and self.seen % spec.every_nth != 0:
            return False
        if spec.probability is not None and self.rng.random() >= spec.probability:
            return False
        self.injected += 1
        return True


class FaultPlan:
    """Picks the fault (or none) for each connection and request; counts injections."""

    def __init__(self, specs: tuple[FaultSpec, ...], *, seed: int) -> None:
        triggers = [_Trigger(s, seed, i) for i, s in enumerate(specs)]
        self._on_accept = [t for t in triggers if t.spec.kind == "refuse"]
        self._on_request = [t for t in triggers if t.spec.kind != "refuse"]
        self.injected: Counter[str] = Counter()

    def on_accept(self) -> FaultSpec | None:
        """The fault for a newly accepted connection (only ``refuse`` applies)."""
        return self._pick(self._on_accept, stream=True)

    def on_request(self, *, stream: bool) -> FaultSpec | None:
        """The fault for a validated completion request; the first spec that fires wins."""
        return self._pick(self._on_request, stream=stream)

    def _pick(self, triggers: list[_Trigger], *, stream: bool) -> FaultSpec | None:
        for t in triggers:
            if not stream and t.spec.kind in STREAM_ONLY_FAULTS:
                continue
            if t.fire():
                self.injected[t.spec.kind] += 1
                return t.spec
        return None

    def counts(self) -> dict[str, int]:
        """Injections so far, by kind."""
        return dict(self.injected)
