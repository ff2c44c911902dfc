"""The simulated rank's scheduler, driven step by step on simulated time (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from xds_server.sim.engine import Engine, EngineSettings, FinishReason, SimRequest
from xds_server.sim.metrics import ServerMetrics
from xds_server.sim.runner import RankRunner, ScaledClock

# Costs that are exact in binary floating point, so step times can be compared exactly.
SETTINGS = EngineSettings(
    max_num_seqs=8,
    max_num_batched_tokens=64,
    kv_cache_tokens=4096,
    block_size_tokens=16,
    step_base_s=1.0,
    prefill_token_s=0.5,
    decode_token_s=0.25,
    max_model_len=4096,
)


def request(name: str, *, prompt: int, output: int, arrival_s: float = 0.0) -> SimRequest:
    return SimRequest(
        request_id=name,
        prompt_tokens=prompt,
        output_target=output,
        finish_reason_at_target=FinishReason.LENGTH,
        arrival_s=arrival_s,
    )


@dataclass
class Trace:
    step_durations: list[float]
    max_running: int
    max_kv_blocks: int
    end_s: float


def run_until_idle(engine: Engine, now_s: float = 0.0) -> Trace:
    durations: list[float] = []
    max_running = max_blocks = 0
    while (plan := engine.plan_step(now_s)) is not None:
        max_running = max(max_running, engine.num_running)
        max_blocks = max(max_blocks, engine.used_blocks)
        now_s += plan.duration_s
        engine.complete_step(plan, now_s)
        durations.append(plan.duration_s)
    return Trace(durations, max_running, max_blocks, now_s)


@pytest.mark.parametrize(
    ("prompt", "output", "expected_steps"),
    [
        # one prefill step (prompt fits the 64-token budget) emits the first token,
        # then one decode step per further token
        (10, 1, [1 + 10 * 0.5]),
        (10, 3, [1 + 10 * 0.5, 1 + 0.25, 1 + 0.25]),
        # chunked prefill: 100 prompt tokens take 64 + 36 before the first token
        (100, 2, [1 + 64 * 0.5, 1 + 36 * 0.5, 1 + 0.25]),
    ],
)
def test_single_request_follows_the_linear_step_model(
    prompt: int, output: int, expected_steps: list[float]
) -> None:
    engine = Engine(SETTINGS)
    sim = request("a", prompt=prompt, output=output)
    engine.add(sim, 0.0)
    trace = run_until_idle(engine)
    assert trace.step_durations == expected_steps
    assert sim.output_tokens == output
    assert sim.finish_reason is FinishReason.LENGTH
    assert sim.first_token_s == expected_steps[0] + (expected_steps[1] if prompt > 64 else 0)
    assert sim.finished_s == sum(expected_steps)
    assert engine.used_blocks == 0


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_decode_step_time_grows_with_the_batch(batch: int) -> None:
    engine = Engine(SETTINGS)
    for index in range(batch):
        engine.add(request(str(index), prompt=4, output=2), 0.0)
    trace = run_until_idle(engine)
    # first step: every prompt prefilled together; second: one decode token each
    assert trace.step_durations == [1 + 4 * batch * 0.5, 1 + batch * 0.25]


@pytest.mark.parametrize(("max_num_seqs", "requests"), [(1, 3), (2, 5), (8, 8)])
def test_max_num_seqs_bounds_running_requests(max_num_seqs: int, requests: int) -> None:
    settings = EngineSettings(**{**SETTINGS.__dict__, "max_num_seqs": max_num_seqs})
    engine = Engine(settings)
    sims = [request(str(i), prompt=4, output=3) for i in range(requests)]
    for sim in sims:
        engine.add(sim, 0.0)
    first = engine.plan_step(0.0)
    assert first is not None
    assert engine.num_running == min(max_num_seqs, requests)
    assert engine.num_waiting == requests - min(max_num_seqs, requests)
    engine.complete_step(first, first.duration_s)
    trace = run_until_idle(engine, first.duration_s)
    assert trace.max_running <= max_num_seqs
    assert all(sim.finish_reason is FinishReason.LENGTH for sim in sims)


def test_waiting_requests_are_admitted_in_arrival_order() -> None:
    settings = EngineSettings(**{**SETTINGS.__dict__, "max_num_seqs": 1})
    engine = Engine(settings)
    sims = [request(str(i), prompt=4, output=2) for i in range(3)]
    for sim in sims:
        engine.add(sim, 0.0)
    run_until_idle(engine)
    finished = [sim.finished_s for sim in sims]
    assert finished == sorted(finished)
    assert sims[2].scheduled_s is not None and sims[1].scheduled_s is not None
    assert sims[2].scheduled_s > sims[1].scheduled_s


def test_kv_cache_budget_keeps_requests_waiting() -> None:
    # 64 tokens of KV = 4 blocks; each 30-token prompt needs 2 blocks, so two fit.
    settings = EngineSettings(**{**SETTINGS.__dict__, "kv_cache_tokens": 64})
    engine = Engine(settings)
    for index in range(3):
        engine.add(request(str(index), prompt=30, output=1), 0.0)
    plan = engine.plan_step(0.0)
    assert plan is not None
    assert (engine.num_running, engine.num_waiting) == (2, 1)
    assert engine.kv_cache_usage == 1.0
    engine.complete_step(plan, plan.duration_s)
    assert engine.used_blocks == 0  # one-token outputs finish at once and free their blocks
    trace = run_until_idle(engine, plan.duration_s)
    assert trace.max_kv_blocks <= settings.kv_blocks


def test_full_kv_cache_preempts_the_latest_request_which_recomputes() -> None:
    # 3 blocks (48 tokens): two 16-token prompts fit, but both cannot grow past 24 tokens.
    settings = EngineSettings(**{**SETTINGS.__dict__, "kv_cache_tokens": 48})
    engine = Engine(settings)
    first, second = request("first", prompt=16, output=12), request("second", prompt=16, output=12)
    engine.add(first, 0.0)
    engine.add(second, 0.0)
    trace = run_until_idle(engine)
    assert engine.counters.preemptions >= 1
    assert second.num_preemptions >= 1 and first.num_preemptions == 0
    assert first.finished_s is not None and second.finished_s is not None
    assert first.finished_s < second.finished_s
    assert (first.output_tokens, second.output_tokens) == (12, 12)
    assert trace.max_kv_blocks <= settings.kv_blocks
    # recomputation shows up as extra prompt work: more steps than without preemption
    roomy = Engine(SETTINGS)
    for sim in (request("a", prompt=16, output=12), request("b", prompt=16, output=12)):
        roomy.add(sim, 0.0)
    assert trace.end_s > run_until_idle(roomy).end_s


def test_abort_frees_the_rank() -> None:
    engine = Engine(SETTINGS)
    finished: list[SimRequest] = []
    engine.on_finished = finished.append
    running, waiting = request("running", prompt=8, output=50), request("w", prompt=8, output=5)
    engine.add(running, 0.0)
    plan = engine.plan_step(0.0)
    assert plan is not None
    engine.add(waiting, 0.0)
    engine.abort(running, 0.5)
    engine.complete_step(plan, plan.duration_s)  # the in-flight step must not revive it
    assert running.finish_reason is FinishReason.ABORT
    assert running.output_tokens == 0
    assert finished == [running]
    run_until_idle(engine, plan.duration_s)
    assert waiting.finish_reason is FinishReason.LENGTH
    assert engine.used_blocks == 0


def test_token_counters_and_timestamps() -> None:
    engine = Engine(SETTINGS)
    first_tokens: list[str] = []
    engine.on_first_token = lambda sim: first_tokens.append(sim.request_id)
    sims = [request("a", prompt=10, output=3), request("b", prompt=20, output=2)]
    for sim in sims:
        engine.add(sim, 0.0)
    run_until_idle(engine)
    assert engine.counters.prompt_tokens == 30
    assert engine.counters.generation_tokens == 5
    assert sorted(first_tokens) == ["a", "b"]
    for sim in sims:
        assert sim.queued_s == 0.0
        assert sim.scheduled_s == 0.0
        assert sim.first_token_s is not None and sim.finished_s is not None
        assert 0.0 < sim.first_token_s <= sim.finished_s


def test_slowdown_stretches_every_step() -> None:
    engine = Engine(SETTINGS)
    engine.add(request("a", prompt=10, output=2), 0.0)
    plan = engine.plan_step(0.0, slowdown=3.0)
    assert plan is not None
    assert plan.duration_s == 3.0 * (1 + 10 * 0.5)


@pytest.mark.parametrize(
    ("prompt", "output", "admissible"),
    [(100, 100, True), (4000, 96, True), (4000, 97, False)],
)
def test_requests_longer_than_the_model_are_refused(
    prompt: int, output: int, admissible: bool
) -> None:
    engine = Engine(SETTINGS)
    problem = engine.check_admissible(prompt_tokens=prompt, output_tokens=output)
    assert (problem is None) == admissible


def test_requests_larger_than_the_kv_cache_are_refused() -> None:
    settings = EngineSettings(**{**SETTINGS.__dict__, "kv_cache_tokens": 64})
    problem = Engine(settings).check_admissible(prompt_tokens=60, output_tokens=10)
    assert problem is not None and "KV cache" in problem


def test_default_settings_reproduce_the_published_qwen3_figures() -> None:
    # The defaults were fitted to Qwen3-0.6B on an H100 (512 in / 128 out): saturation near
    # 95 req/s and a 2.4 ms step at 16 req/s in the linear model's steady state.
    settings = EngineSettings()
    per_request_s = 512 * settings.prefill_token_s + 128 * settings.decode_token_s
    assert 1 / per_request_s == pytest.approx(95, rel=0.02)
    assert settings.step_base_s / (1 - 16 * per_request_s) == pytest.approx(0.0024, rel=0.02)


def test_stats_are_the_last_steps_as_vllm_publishes_them() -> None:
    settings = EngineSettings(**{**SETTINGS.__dict__, "max_num_seqs": 2})
    engine = Engine(settings)
    for index in range(3):
        engine.add(request(str(index), prompt=4, output=2), 0.0)
    assert (engine.stats.running, engine.stats.waiting) == (0, 0)  # no step has run yet
    plan = engine.plan_step(0.0)
    assert plan is not None
    # A request that arrives while the step runs is in no count the step publishes: vLLM
    # adds it to its scheduler only between steps.
    engine.add(request("late", prompt=4, output=2), 0.5)
    engine.complete_step(plan, plan.duration_s)
    assert (engine.num_running, engine.num_waiting) == (2, 2)
    # The one the full rank's schedule left waiting is reported; the late one is not.
    assert (engine.stats.running, engine.stats.waiting) == (2, 1)
    now = plan.duration_s
    plan = engine.plan_step(now)
    assert plan is not None
    engine.complete_step(plan, now + plan.duration_s)
    # Both first requests finished in that step and have left `running`; the two waiting
    # ones are admitted only by the next schedule, so the step reports them waiting beside
    # free slots, as vLLM does.
    assert (engine.stats.running, engine.stats.waiting) == (0, 2)


def test_the_gauges_show_the_last_steps_counts_not_the_queue_now() -> None:
    engine = Engine(EngineSettings(**{**SETTINGS.__dict__, "max_num_seqs": 1}))
    runner = RankRunner(engine=engine, clock=ScaledClock(1.0), global_rank=3,
                        slowdown=lambda: 1.0)
    metrics = ServerMetrics(model_name="m", runners=[runner], max_model_len=4096)
    engine.add(request("a", prompt=4, output=3), 0.0)
    plan = engine.plan_step(0.0)
    assert plan is not None
    engine.add(request("b", prompt=4, output=3), 0.5)  # arrives during the step
    engine.complete_step(plan, plan.duration_s)

    def gauge(name: str) -> float:
        text = generate_latest(metrics.registry).decode()
        return next(s.value for f in text_string_to_metric_families(text)
                    for s in f.samples if s.name == name and s.labels["engine"] == "3")

    assert (gauge("vllm:num_requests_running"), gauge("vllm:num_requests_waiting")) == (1, 0)
    plan = engine.plan_step(plan.duration_s)  # the full rank's schedule leaves "b" waiting
    assert plan is not None
    engine.complete_step(plan, 2 * plan.duration_s)
    assert (gauge("vllm:num_requests_running"), gauge("vllm:num_requests_waiting")) == (1, 1)
