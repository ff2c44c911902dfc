"""The `/metrics` of one simulated server, with vLLM V1's names, types, labels and buckets.

Names, help texts and buckets follow vLLM's `PrometheusStatLogger`
(vllm/v1/metrics/loggers.py): every series carries `model_name` and `engine`, where `engine`
is the global DP rank, so a hybrid-mode server reports all its ranks on one page. Scheduler
state and token counters are read from the engines at scrape time (always exact, no cost per
step); request histograms are observed when a request produces its first token or finishes.
Each server has its own `CollectorRegistry`, so many servers can share one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from xds_server.sim.engine import FinishReason, SimRequest
from xds_server.sim.runner import RankRunner

LABELS = ["model_name", "engine"]

_Recorder = Callable[[SimRequest], None]

TTFT_BUCKETS_S = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
]
REQUEST_LATENCY_BUCKETS_S = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
]


def build_1_2_5_buckets(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count buckets)."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class _EngineStateCollector:
    """A prometheus_client custom collector (duck-typed: it only needs `collect`)."""

    def __init__(self, model_name: str, runners: Sequence[RankRunner]) -> None:
        self._model_name = model_name
        self._runners = runners
        self.success: dict[tuple[int, FinishReason], int] = {
            (runner.global_rank, reason): 0 for runner in runners for reason in FinishReason
        }

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels=LABELS,
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            labels=LABELS,
        )
        kv_usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=LABELS
        )
        preemptions = CounterMetricFamily(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            labels=LABELS,
        )
        prompt = CounterMetricFamily(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels=LABELS
        )
        generation = CounterMetricFamily(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels=LABELS
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*LABELS, "finished_reason"],
        )
        for runner in self._runners:
            engine = runner.engine
            labels = [self._model_name, str(runner.global_rank)]
            running.add_metric(labels, engine.stats.running)
            waiting.add_metric(labels, engine.stats.waiting)
            kv_usage.add_metric(labels, engine.kv_cache_usage)
            preemptions.add_metric(labels, engine.counters.preemptions)
            prompt.add_metric(labels, engine.counters.prompt_tokens)
            generation.add_metric(labels, engine.counters.generation_tokens)
            for reason in FinishReason:
                count = self.success[(runner.global_rank, reason)]
                success.add_metric([*labels, reason.value], count)
        yield from (running, waiting, kv_usage, preemptions, prompt, generation, success)


class ServerMetrics:
    """Registry and recorders for one simulated server (all of its ranks)."""

    def __init__(
        self, *, model_name: str, runners: Sequence[RankRunner], max_model_len: int
    ) -> None:
        self.registry = CollectorRegistry()
        self._model_name = model_name
        self._state = _EngineStateCollector(model_name, runners)
        self.registry.register(self._state)
        token_buckets = build_1_2_5_buckets(max_model_len)

        def histogram(name: str, documentation: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(
                name, documentation, LABELS, buckets=buckets, registry=self.registry
            )

        self._ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS_S,
        )
        self._e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self._queue = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self._inference = histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self._prefill = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self._decode = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self._prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self._generation_tokens = histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            token_buckets,
        )
        for runner in runners:
            runner.engine.on_first_token = self._first_token_recorder(runner.global_rank)
            runner.engine.on_finished = self._finish_recorder(runner.global_rank)

    def render(self) -> bytes:
        text: bytes = generate_latest(self.registry)
        return text

    def _first_token_recorder(self, rank: int) -> _Recorder:
        ttft = self._ttft.labels(self._model_name, str(rank))

        def record(request: SimRequest) -> None:
            if request.first_token_s is not None:
                ttft.observe(request.first_token_s - request.arrival_s)

        return record

    def _finish_recorder(self, rank: int) -> _Recorder:
        labels = (self._model_name, str(rank))
        e2e, queue = self._e2e.labels(*labels), self._queue.labels(*labels)
        inference, prefill = self._inference.labels(*labels), self._prefill.labels(*labels)
        decode = self._decode.labels(*labels)
        prompt_tokens = self._prompt_tokens.labels(*labels)
        generation_tokens = self._generation_tokens.labels(*labels)

        def record(request: SimRequest) -> None:
            assert request.finish_reason is not None and request.finished_s is not None
            self._state.success[(rank, request.finish_reason)] += 1
            e2e.observe(request.finished_s - request.arrival_s)
            if request.scheduled_s is None or request.queued_s is None:
                return  # aborted while waiting: never ran
            queue.observe(request.scheduled_s - request.queued_s)
            inference.observe(request.finished_s - request.scheduled_s)
            prompt_tokens.observe(request.prompt_tokens)
            generation_tokens.observe(request.output_tokens)
            if request.first_token_s is not None:
                prefill.observe(request.first_token_s - request.scheduled_s)
                decode.observe(request.finished_s - request.first_token_s)

        return record

