"""How one API server spreads requests over its ranks, the way vLLM's internal balancer does.

vLLM's `DPLBAsyncMPClient.get_core_engine_for_request` (vllm/v1/engine/core_client.py)
scores every engine `waiting * 4 + running` from the counts the DP coordinator publishes
(about every 100 ms), scans from a start index that rotates after each pick so ties do not
always favour the same engine, takes the lowest score, and adds its pick to that engine's
waiting count so that a burst between two publications still spreads. A request carrying
`X-data-parallel-rank` skips all of this.

The counts are a snapshot taken at most `stats_interval_s` ago (0 means live counts), so the
simulator herds the way vLLM does between publications.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

WAITING_WEIGHT = 4


@dataclass
class _Snapshot:
    taken_s: float
    counts: list[list[int]]  # [waiting, running] per engine, optimistically bumped


class DPBalancer:
    """Picks a local engine index for each request without an explicit rank."""

    def __init__(
        self,
        *,
        num_engines: int,
        read_counts: Callable[[], Sequence[tuple[int, int]]],
        stats_interval_s: float,
    ) -> None:
        if num_engines < 1:
            raise ValueError("need at least one engine")
        self._num_engines = num_engines
        self._read_counts = read_counts
        self._stats_interval_s = stats_interval_s
        self._start = 0
        self._snapshot: _Snapshot | None = None

    def pick(self, now_s: float) -> int:
        if self._num_engines == 1:
            return 0
        snapshot = self._snapshot
        if snapshot is None or now_s - snapshot.taken_s >= self._stats_interval_s:
            counts = [[waiting, running] for waiting, running in self._read_counts()]
            snapshot = self._snapshot = _Snapshot(now_s, counts)
        best_index, best_score = 0, None
        for offset in range(self._num_engines):
            index = (self._start + offset) % self._num_engines
            waiting, running = snapshot.counts[index]
            score = waiting * WAITING_WEIGHT + running
            if best_score is None or score < best_score:
                best_index, best_score = index, score
        snapshot.counts[best_index][0] += 1
        self._start = (self._start + 1) % self._num_engines
        return best_index
