"""The engine model of one simulated vLLM data-parallel rank: a pure scheduler, no I/O.

It imitates vLLM V1's scheduler closely enough that queueing behaves like a real GPU:

- at most `max_num_seqs` requests run; the rest wait in FCFS order;
- every step has a token budget (`max_num_batched_tokens`): running requests are served
  first (one token each when decoding, a chunk when still prefilling), then waiting requests
  are admitted with a chunk of their prompt (chunked prefill);
- the KV cache is a pool of `block_size_tokens`-token blocks; a request holds blocks for the
  tokens it has computed. A waiting request is not admitted when its chunk does not fit, and
  a running request that cannot grow preempts the most recently admitted one, which goes back
  to the head of the queue and recomputes (vLLM V1's recompute preemption);
- a step takes `step_base_s + prefill_token_s * prefill tokens + decode_token_s * decode
  tokens` (the linear model that fits vLLM well), times a slowdown factor for faults.

Defaults (`EngineSettings`) model Qwen3-0.6B on one H100. The published figures they come
from (see DESIGN.md, "A vLLM simulator"): TTFT 39 ms and 2.4 ms per output token at 16 req/s,
saturation near 95 req/s, with 512 prompt and 128 output tokens. With the linear model, the
mean step time at arrival rate λ is `step_base_s / (1 - λ (512 p + 128 d))` where p and d are
the per-token costs, so saturation is λ = 1 / (512 p + 128 d); 95 req/s gives
512 p + 128 d = 10.5 ms, and a 2.4 ms step at 16 req/s gives `step_base_s` = 2.0 ms. The
prefill/decode split follows the ratio fitted for an 8B model on an H100 (5.8 ms per step +
17 µs per prefill token + 6 µs per decode token): p = 19 µs, d = 6.6 µs. A 512-token prefill
then takes one ~12 ms step, so the measured 39 ms TTFT leaves ~26 ms of fixed front-end cost
per request (HTTP, tokenization), which the server adds (`frontend_overhead_s`).

All times here are *simulated* seconds; `runner` maps them to wall-clock time.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineSettings:
    """The timing and capacity model of one rank. Times in simulated seconds."""

    max_num_seqs: int = 1024
    """Most requests running at once (vLLM `--max-num-seqs`; 1024 on an H100 server)."""
    max_num_batched_tokens: int = 8192
    """Token budget per step (vLLM `--max-num-batched-tokens`; 8192 on an H100 server)."""
    kv_cache_tokens: int = 600_000
    """KV-cache size in tokens. Qwen3-0.6B keeps 112 KiB per token (28 layers x 8 KV heads x
    128 dims x 2 (K, V) x 2 bytes); ~66 GiB free on an 80 GiB H100 at 0.9 utilization holds
    about 600k tokens."""
    block_size_tokens: int = 16
    """KV-cache block size (vLLM's default)."""
    step_base_s: float = 0.002
    """Fixed cost of one engine step."""
    prefill_token_s: float = 19e-6
    """Cost per prompt token computed in a step."""
    decode_token_s: float = 6.6e-6
    """Cost per decoded token (one per decoding request) in a step."""
    max_model_len: int = 40_960
    """Longest prompt + output accepted (Qwen3-0.6B's context)."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.block_size_tokens < 1 or self.kv_cache_tokens < self.block_size_tokens:
            raise ValueError("the KV cache must hold at least one block")
        if min(self.step_base_s, self.prefill_token_s, self.decode_token_s) < 0:
            raise ValueError("step costs must not be negative")

    @property
    def kv_blocks(self) -> int:
        return self.kv_cache_tokens // self.block_size_tokens

    def step_time_s(self, *, prefill_tokens: int, decode_tokens: int) -> float:
        return (
            self.step_base_s
            + self.prefill_token_s * prefill_tokens
            + self.decode_token_s * decode_tokens
        )


class FinishReason(enum.Enum):
    """vLLM's finish reasons, as its `finished_reason` metric label spells them."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(eq=False)
class SimRequest:
    """One request inside a rank. `on_progress` is called after every step that changed it."""

    request_id: str
    prompt_tokens: int
    output_target: int
    finish_reason_at_target: FinishReason
    arrival_s: float
    """When the API server received it (vLLM's `arrival_time`): TTFT and e2e start here."""
    on_progress: Callable[[SimRequest], None] = field(default=lambda _r: None, repr=False)
    output_tokens: int = 0
    computed_tokens: int = 0
    blocks: int = 0
    scheduled_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    queued_s: float | None = None

    @property
    def tokens_to_compute(self) -> int:
        """Tokens to compute before the next token comes out.

        Producing output token k+1 needs the KV of the prompt and the k tokens before it:
        the whole prompt at first (in chunks), one token per step after that, and all of it
        again after a preemption (vLLM V1 recomputes rather than swaps).
        """
        return self.prompt_tokens + self.output_tokens - self.computed_tokens

    @property
    def decoding(self) -> bool:
        return self.output_tokens > 0 and self.tokens_to_compute == 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepPlan:
    """What one step computes: (request, tokens) pairs and how long it takes."""

    batch: tuple[tuple[SimRequest, int], ...]
    prefill_tokens: int
    decode_tokens: int
    duration_s: float


@dataclass
class EngineCounters:
    """Cumulative counts the metrics read."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0


@dataclass(frozen=True)
class SchedulerStats:
    """What the rank reports (its gauges, its load reports, its counts to the balancer): the
    scheduler's state as of its last step, as vLLM V1 publishes it. vLLM adds a new request
    to its scheduler between steps and takes the stats after a step's schedule: a request
    that arrived during a step is in neither count until the next step has scheduled it, and
    a request counts as waiting only where a schedule left it so (a full rank, the token
    budget, the KV cache), while the requests that finished in the step have already left
    `running`."""

    running: int = 0
    waiting: int = 0


class Engine:
    """One rank's scheduler. Call `add`, then alternate `plan_step` and `complete_step`."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.used_blocks = 0
        self.counters = EngineCounters()
        self.stats = SchedulerStats()
        #: Requests added since the last schedule: no published stats count them yet.
        self._unscheduled = 0
        self.on_first_token: Callable[[SimRequest], None] = lambda _r: None
        self.on_finished: Callable[[SimRequest], None] = lambda _r: None

    # -- state ----------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # The true state now (the bench's truth, /sim/state); what the rank reports is `stats`.
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Share of KV blocks in use, 0..1 (vLLM's `kv_cache_usage_perc`)."""
        return self.used_blocks / self.settings.kv_blocks

    def check_admissible(self, *, prompt_tokens: int, output_tokens: int) -> str | None:
        """Why a request can never run here (an error message), or None if it can."""
        total = prompt_tokens + output_tokens
        if total > self.settings.max_model_len:
            return (
                f"This model's maximum context length is {self.settings.max_model_len} "
                f"tokens. However, you requested {total} tokens ({prompt_tokens} in the "
                f"messages, {output_tokens} in the completion). Please reduce the length of "
                "the messages or completion."
            )
        if self._blocks_for(total) > self.settings.kv_blocks:
            # vLLM refuses to start when the KV cache cannot hold max_model_len; the
            # simulator allows small caches for tests, so it checks per request instead.
            return (
                f"Request needs {total} tokens of KV cache but this engine holds "
                f"{self.settings.kv_cache_tokens}."
            )
        return None

    # -- transitions ----------------------------------------------------------------------

    def add(self, request: SimRequest, now_s: float) -> None:
        request.queued_s = now_s
        self.waiting.append(request)
        self._unscheduled += 1

    def abort(self, request: SimRequest, now_s: float) -> None:
        """Drop a request (client went away); it counts as finished with reason abort."""
        if request.finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._finish(request, FinishReason.ABORT, now_s)

    def plan_step(self, now_s: float, *, slowdown: float = 1.0) -> StepPlan | None:
        """Choose the next batch (admitting and preempting as vLLM would), or None if idle."""
        budget = self.settings.max_num_batched_tokens
        self._unscheduled = 0
        batch: list[tuple[SimRequest, int]] = []
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            tokens = min(request.tokens_to_compute, budget)
            while not self._grow(request, tokens):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                batch.append((request, tokens))
                budget -= tokens
                index += 1
        # Like vLLM V1, nothing new is admitted in a step that had to preempt.
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.settings.max_num_seqs
        ):
            request = self.waiting[0]
            tokens = min(request.tokens_to_compute, budget)
            if not self._grow(request, tokens):
                break
            self.waiting.popleft()
            self.running.append(request)
            if request.scheduled_s is None:
                request.scheduled_s = max(now_s, request.queued_s or now_s)
            batch.append((request, tokens))
            budget -= tokens
        if not batch:
            self.stats = SchedulerStats(len(self.running), len(self.waiting))
            return None
        decode = sum(tokens for request, tokens in batch if request.decoding)
        prefill = sum(tokens for _request, tokens in batch) - decode
        duration = self.settings.step_time_s(prefill_tokens=prefill, decode_tokens=decode)
        return StepPlan(tuple(batch), prefill, decode, duration * slowdown)

    def complete_step(self, plan: StepPlan, now_s: float) -> None:
        """Apply a planned step at its end time: tokens computed, tokens emitted."""
        any_finished = False
        for request, tokens in plan.batch:
            if request.finished:
                continue  # aborted while the step ran
            request.computed_tokens += tokens
            if request.tokens_to_compute > 0:
                continue  # a chunk of the prompt; no token yet
            if request.first_token_s is None:
                request.first_token_s = max(now_s, request.scheduled_s or now_s)
                self.counters.prompt_tokens += request.prompt_tokens
            request.output_tokens += 1
            self.counters.generation_tokens += 1
            if request.output_tokens == 1:
                self.on_first_token(request)
            if request.output_tokens >= request.output_target:
                self._finish(request, request.finish_reason_at_target, now_s)
                any_finished = True
            else:
                request.on_progress(request)
        if any_finished:
            self.running = [request for request in self.running if not request.finished]
        self.stats = SchedulerStats(len(self.running),
                                    max(0, len(self.waiting) - self._unscheduled))

    # -- internals ------------------------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.settings.block_size_tokens)

    def _grow(self, request: SimRequest, tokens: int) -> bool:
        needed = self._blocks_for(request.computed_tokens + tokens) - request.blocks
        if needed <= 0:
            return True
        if self.used_blocks + needed > self.settings.kv_blocks:
            return False
        request.blocks += needed
        self.used_blocks += needed
        return True

    def _release(self, request: SimRequest) -> None:
        self.used_blocks -= request.blocks
        request.blocks = 0

    def _preempt(self, request: SimRequest) -> None:
        self._release(request)
        request.computed_tokens = 0
        request.num_preemptions += 1
        self.counters.preemptions += 1
        self.waiting.appendleft(request)

    def _finish(self, request: SimRequest, reason: FinishReason, now_s: float) -> None:
        self._release(request)
        request.finish_reason = reason
        request.finished_s = now_s
        request.on_progress(request)
        self.on_finished(request)
