"""Faults a simulated server can be told to show, so tests can see the balancer react.

- `slowdown`: every engine step takes this many times longer (a throttled or sick GPU);
  with `slow_rank`, only that local rank's steps (one sick GPU behind a hybrid-mode server);
- `error_rate`: this share of inference requests fails with HTTP 500 (an engine error);
- `hang`: requests (and `/health`, `/metrics`) are accepted but not answered until the
  fault is cleared (a wedged process: the case only timeouts catch);
- `refuse`: the listening socket is closed, so new connections are refused, and re-opened
  when cleared (a crashed or restarting process).

They are set at start-up by flags and at run time through `POST /sim/fault`.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Faults:
    slowdown: float = 1.0
    #: The local rank `slowdown` applies to; -1: every rank of the server.
    slow_rank: int = -1
    error_rate: float = 0.0
    hang: bool = False
    refuse: bool = False

    def __post_init__(self) -> None:
        if self.slowdown <= 0:
            raise ValueError("slowdown must be positive")
        if self.slow_rank < -1:
            raise ValueError("slow_rank must be a local rank index, or -1 for every rank")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be within [0, 1]")

    def updated(self, changes: dict[str, Any]) -> Faults:
        """These faults with the fields named in `changes` replaced (validated)."""
        known = set(asdict(self))
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        values = asdict(self)
        for name, value in changes.items():
            default = values[name]
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be true or false")
            elif not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"{name} must be a number")
            elif isinstance(default, int) and value != int(value):
                raise ValueError(f"{name} must be a whole number")
            values[name] = type(default)(value)
        return Faults(**values)

    def slowdown_of(self, rank: int) -> float:
        """The step-time factor of local rank `rank`."""
        return self.slowdown if self.slow_rank in (-1, rank) else 1.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class FaultState:
    """The live faults of one simulated server, with what waiting on them needs."""

    def __init__(self, initial: Faults, *, seed: int | None = None) -> None:
        self._faults = initial
        self._rng = random.Random(seed)
        self._released = asyncio.Event()
        if not initial.hang:
            self._released.set()

    @property
    def current(self) -> Faults:
        return self._faults

    def set(self, faults: Faults) -> None:
        self._faults = faults
        if faults.hang:
            self._released.clear()
        else:
            self._released.set()

    async def wait_unless_hung(self) -> None:
        """Return at once, or when the hang fault is cleared."""
        await self._released.wait()

    def should_fail(self) -> bool:
        rate = self._faults.error_rate
        return rate > 0 and self._rng.random() < rate
