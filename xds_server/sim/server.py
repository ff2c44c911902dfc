"""One simulated vLLM API server: aiohttp glue between HTTP and its ranks' engines.

It fronts `num_ranks` engines (hybrid mode; 1 is external mode), picks a rank per request
like vLLM's internal balancer unless `X-data-parallel-rank` pins one (a local index, checked
against the ranks this server manages, 400 otherwise, as vLLM does), and answers in vLLM's
shapes (`protocol`). Every response names the server (`x-hybridlb-replica: IP:PORT`), and
every response a rank served names its global rank (`x-hybridlb-rank`), so tests and
benchmarks can see where a balancer sent each request.

Admin endpoints for tests and benchmarks: `POST /sim/fault` sets faults (on this server, or
on a sibling in the same process with `"target": "IP:PORT"`; `"duration_s"` clears them
after that many wall-clock seconds), `GET /sim/state` gives the true queues per rank (the
benchmark's oracle reads it), `GET /sim/steps` hands over (and forgets) the step-timing log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from xds_server.sim.balancer import DPBalancer
from xds_server.sim.engine import Engine, EngineSettings, FinishReason, SimRequest
from xds_server.sim.faults import Faults, FaultState
from xds_server.sim.metrics import ServerMetrics
from xds_server.sim.orca import FORMAT_HEADER, orca_header
from xds_server.sim.protocol import (
    SSE_DONE,
    GenerationRequest,
    RequestError,
    error_body,
    full_response,
    models_body,
    new_request_id,
    now_unix,
    parse_generation,
    stream_chunk,
    usage_chunk,
)
from xds_server.sim.runner import RankRunner, ScaledClock
from xds_server.sim.tokens import token_text

log = logging.getLogger(__name__)

RANK_HEADER = "X-data-parallel-rank"
REPLICA_RESPONSE_HEADER = "x-hybridlb-replica"
RANK_RESPONSE_HEADER = "x-hybridlb-rank"
#: The node of the proxy (or client) a request entered through, set by the load generator:
#: the simulator's stand-in for where the bytes come from, to model a cross-node hop.
ORIGIN_NODE_HEADER = "x-hybridlb-origin-node"


@dataclass(frozen=True)
class ServerSettings:
    """One simulated API server. Times in simulated seconds unless the name says wall."""

    host: str = "127.0.0.1"
    port: int = 8001
    """Listening port; 0 picks a free one."""
    model_name: str = "Qwen/Qwen3-0.6B"
    num_ranks: int = 1
    """Engines behind this server (vLLM `--data-parallel-size-local`); 1 is external mode."""
    start_rank: int = 0
    """Global rank of the first engine (vLLM `--data-parallel-start-rank`)."""
    frontend_overhead_s: float = 0.026
    """Fixed per-request API-server cost before the engine sees it (HTTP, tokenization):
    what is left of Qwen3-0.6B's 39 ms TTFT at 16 req/s after one prefill step."""
    natural_output_tokens: int = 128
    """Tokens a request generates before it "meets EOS" (finish_reason stop) when
    max_tokens allows more and ignore_eos is off."""
    lb_stats_interval_s: float = 0.1
    """Age of the counts the internal balancer sees (vLLM's coordinator publishes about
    every 100 ms); 0 means live counts."""
    seed: int | None = None
    """Seed of the error-rate fault's random draws."""
    node: str = ""
    """The node this server runs on: a request whose `x-hybridlb-origin-node` names another
    node crossed a network hop to get here."""
    hop_s: float = 0.0
    """Latency a cross-node request pays once, before the server sees it (0: no hop)."""
    hop_chunk_s: float = 0.0
    """Latency each streamed chunk of a cross-node request pays on its way back."""

    def __post_init__(self) -> None:
        if self.num_ranks < 1 or self.start_rank < 0:
            raise ValueError("num_ranks must be >= 1 and start_rank >= 0")
        if self.hop_s < 0 or self.hop_chunk_s < 0:
            raise ValueError("hop_s and hop_chunk_s must not be negative")


class SimServer:
    """A simulated vLLM API server with its ranks; `start`, then run `engine_loops()`."""

    def __init__(
        self,
        settings: ServerSettings,
        engine_settings: EngineSettings,
        *,
        clock: ScaledClock,
        faults: Faults | None = None,
    ) -> None:
        self.settings = settings
        self.engine_settings = engine_settings
        self.clock = clock
        self.faults = FaultState(faults or Faults(), seed=settings.seed)
        _check_slow_rank(self.faults.current, settings.num_ranks)
        self.runners = [
            RankRunner(
                engine=Engine(engine_settings),
                clock=clock,
                global_rank=settings.start_rank + local,
                slowdown=functools.partial(self._slowdown_of, local),
            )
            for local in range(settings.num_ranks)
        ]
        self.balancer = DPBalancer(
            num_engines=settings.num_ranks,
            read_counts=lambda: [(r.engine.stats.waiting, r.engine.stats.running)
                                 for r in self.runners],
            stats_interval_s=settings.lb_stats_interval_s,
        )
        self.metrics = ServerMetrics(
            model_name=settings.model_name,
            runners=self.runners,
            max_model_len=engine_settings.max_model_len,
        )
        self.draining = False
        self.in_flight = 0
        self.cross_node_requests = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.peers: Mapping[str, SimServer] = {}
        self._port = settings.port
        self._listener: asyncio.Server | None = None
        self._app_runner: web.AppRunner | None = None
        self._fault_reset: asyncio.Task[None] | None = None
        self._created = now_unix()
        self.app = self._build_app()

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def address(self) -> str:
        host = self.settings.host if self.settings.host not in ("", "0.0.0.0") else "127.0.0.1"
        return f"{host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        # vLLM aborts a request whose client went away (its `with_cancellation`), so that
        # a balancer's timeout frees the rank: cancel the handler on disconnect too.
        self._app_runner = web.AppRunner(self.app, handle_signals=False, access_log=None,
                                         handler_cancellation=True)
        await self._app_runner.setup()
        await self._listen()
        if self.faults.current.refuse:
            self._stop_listening()

    def engine_loops(self) -> list[Coroutine[Any, Any, None]]:
        """The ranks' loops, for the caller to run as root tasks."""
        return [runner.run() for runner in self.runners]

    def begin_drain(self) -> None:
        """Fail readiness and refuse new requests; in-flight ones carry on."""
        self.draining = True

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def close(self) -> None:
        if self._fault_reset is not None:
            self._fault_reset.cancel()
        self._stop_listening()
        if self._app_runner is not None:
            await self._app_runner.cleanup()

    async def _listen(self) -> None:
        assert self._app_runner is not None and self._app_runner.server is not None
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._app_runner.server, self.settings.host, self._port,
            reuse_address=True, backlog=1024,
        )
        self._port = self._listener.sockets[0].getsockname()[1]

    def _stop_listening(self) -> None:
        # Only the listening socket: connections already open keep being served.
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def apply_faults(self, faults: Faults) -> None:
        self.faults.set(faults)
        if faults.refuse:
            self._stop_listening()
        elif self._listener is None and self._app_runner is not None:
            await self._listen()

    # -- HTTP -----------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.on_response_prepare.append(self._stamp_replica)
        app.router.add_get("/health", self._hangable(self._health))
        app.router.add_get("/v1/models", self._hangable(self._models))
        app.router.add_get("/metrics", self._hangable(self._metrics))
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/sim/fault", self._set_fault)
        app.router.add_get("/sim/state", self._state)
        app.router.add_get("/sim/steps", self._steps)
        return app

    async def _stamp_replica(self, _request: web.Request, response: web.StreamResponse) -> None:
        response.headers[REPLICA_RESPONSE_HEADER] = self.address

    def _hangable(
        self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            await self.faults.wait_unless_hung()
            return await handler(request)

        return wrapped

    async def _health(self, _request: web.Request) -> web.StreamResponse:
        return web.Response(status=503 if self.draining else 200)

    async def _models(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response(
            models_body(self.settings.model_name, self.engine_settings.max_model_len,
                        self._created)
        )

    async def _metrics(self, _request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=self.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        self._enter()
        try:
            await self.faults.wait_unless_hung()
            if self.draining:
                return _error(503, "The server is shutting down.", "ServiceUnavailableError")
            try:
                generation, local_rank = await self._validate(request, chat=chat)
            except RequestError as exc:
                return web.json_response(exc.body(), status=exc.status)
            hop = self._crossed(request)
            if hop:
                self.cross_node_requests += 1
                await self.clock.sleep(self.settings.hop_s)
            received_s = self.clock.now()
            await self.clock.sleep(self.settings.frontend_overhead_s)
            if local_rank is None:
                local_rank = self.balancer.pick(self.clock.now())
            runner = self.runners[local_rank]
            headers = {RANK_RESPONSE_HEADER: str(runner.global_rank)}
            if self.faults.should_fail():
                return _error(500, "Simulated engine failure.", "InternalServerError",
                              headers=headers)
            return await self._serve(request, generation, runner, received_s, headers,
                                     chunk_delay_s=self.settings.hop_chunk_s if hop else 0.0)
        finally:
            self._leave()

    def _crossed(self, request: web.Request) -> bool:
        origin = request.headers.get(ORIGIN_NODE_HEADER, "")
        return bool(origin) and origin != self.settings.node

    async def _validate(
        self, request: web.Request, *, chat: bool
    ) -> tuple[GenerationRequest, int | None]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"Invalid JSON body: {exc}") from exc
        generation = parse_generation(body, chat=chat)
        if generation.model != self.settings.model_name:
            raise RequestError(f"The model `{generation.model}` does not exist.",
                               status=404, kind="NotFoundError", param="model")
        local_rank = None
        raw_rank = request.headers.get(RANK_HEADER)
        if raw_rank is not None:
            try:
                local_rank = int(raw_rank)
            except ValueError as exc:
                raise RequestError(f"Invalid {RANK_HEADER} header: {raw_rank!r}") from exc
            if not 0 <= local_rank < self.settings.num_ranks:
                raise RequestError(f"data_parallel_rank {local_rank} is out of range "
                                   f"[0, {self.settings.num_ranks}).")
        problem = self.runners[0].engine.check_admissible(
            prompt_tokens=generation.prompt_tokens,
            # vLLM checks the requested max_tokens, however early the output would stop.
            output_tokens=generation.max_tokens or self._output_target(generation)[0],
        )
        if problem is not None:
            raise RequestError(problem)
        return generation, local_rank

    def _output_target(self, generation: GenerationRequest) -> tuple[int, FinishReason]:
        limit = generation.max_tokens
        if limit is None:
            limit = self.engine_settings.max_model_len - generation.prompt_tokens
        natural = self.settings.natural_output_tokens
        if generation.ignore_eos or limit <= natural:
            return max(1, limit), FinishReason.LENGTH
        return natural, FinishReason.STOP

    async def _serve(
        self,
        request: web.Request,
        generation: GenerationRequest,
        runner: RankRunner,
        received_s: float,
        headers: dict[str, str],
        *,
        chunk_delay_s: float = 0.0,
    ) -> web.StreamResponse:
        request_id = new_request_id(generation.chat)
        target, reason_at_target = self._output_target(generation)
        progressed = asyncio.Event()
        wake_every_token = generation.stream

        def on_progress(sim: SimRequest) -> None:
            if wake_every_token or sim.finished:
                progressed.set()

        sim = SimRequest(
            request_id=request_id,
            prompt_tokens=generation.prompt_tokens,
            output_target=target,
            finish_reason_at_target=reason_at_target,
            arrival_s=received_s,
            on_progress=on_progress,
        )
        created = now_unix()
        runner.submit(sim)
        try:
            if not generation.stream:
                await progressed.wait()
                text = "".join(token_text(i) for i in range(sim.output_tokens))
                body = full_response(
                    request=generation, request_id=request_id, created=created, text=text,
                    completion_tokens=sim.output_tokens,
                    finish_reason=_reason(sim.finish_reason),
                )
                return web.json_response(body, headers={**headers, **self._orca(request)})
            return await self._stream(request, generation, sim, progressed, created, headers,
                                      chunk_delay_s)
        finally:
            # The client left (write failed or the handler was cancelled): free the rank.
            if not sim.finished:
                runner.abort(sim)

    async def _stream(
        self,
        request: web.Request,
        generation: GenerationRequest,
        sim: SimRequest,
        progressed: asyncio.Event,
        created: int,
        headers: dict[str, str],
        chunk_delay_s: float = 0.0,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", **headers}
        )
        await response.prepare(request)
        request_id = sim.request_id
        with contextlib.suppress(ConnectionResetError):
            if generation.chat:
                await response.write(stream_chunk(
                    request=generation, request_id=request_id, created=created, text=None,
                    finish_reason=None, role=True))
            sent = 0
            while True:
                await progressed.wait()
                progressed.clear()
                produced = sim.output_tokens
                if produced > sent or sim.finished:
                    text = "".join(token_text(i) for i in range(sent, produced))
                    sent = produced
                    finish = _reason(sim.finish_reason) if sim.finished else None
                    if chunk_delay_s:
                        await self.clock.sleep(chunk_delay_s)
                    await response.write(stream_chunk(
                        request=generation, request_id=request_id, created=created,
                        text=text, finish_reason=finish))
                if sim.finished:
                    break
            if generation.include_usage:
                await response.write(usage_chunk(
                    request=generation, request_id=request_id, created=created,
                    completion_tokens=sim.output_tokens))
            await response.write(SSE_DONE)
            await response.write_eof()
        return response

    def _orca(self, request: web.Request) -> dict[str, str]:
        # vLLM reads each gauge's first sample: the first engine's, not the server's sum.
        first = self.runners[0].engine
        return orca_header(request.headers.get(FORMAT_HEADER, ""),
                           num_requests_waiting=first.stats.waiting,
                           kv_cache_usage_perc=first.kv_cache_usage)

    def _slowdown_of(self, local: int) -> float:
        return self.faults.current.slowdown_of(local)

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    # -- admin ----------------------------------------------------------------------------

    async def _set_fault(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            body = dict(body)
            target_name = body.pop("target", None)
            duration_s = body.pop("duration_s", None)
            clear = bool(body.pop("clear", False))
            target = self._resolve_target(target_name)
            base = Faults() if clear else target.faults.current
            faults = base.updated(body)
            _check_slow_rank(faults, target.settings.num_ranks)
            if duration_s is not None and (
                not isinstance(duration_s, int | float) or duration_s <= 0
            ):
                raise ValueError("duration_s must be a positive number of seconds")
        except (ValueError, json.JSONDecodeError) as exc:
            return _error(400, str(exc), "BadRequestError")
        previous = target.faults.current
        await target.apply_faults(faults)
        if duration_s is not None:
            target.schedule_fault_reset(previous, float(duration_s))
        log.info("faults on %s: %s", target.address, faults.as_dict())
        return web.json_response({"replica": target.address, "faults": faults.as_dict()})

    def _resolve_target(self, name: Any) -> SimServer:
        if name is None or name == self.address:
            return self
        if isinstance(name, int):
            name = f"{self.address.rsplit(':', 1)[0]}:{name}"
        if isinstance(name, str) and name in self.peers:
            return self.peers[name]
        raise ValueError(f"no simulated server {name!r} in this process")

    def schedule_fault_reset(self, faults: Faults, after_wall_s: float) -> None:
        if self._fault_reset is not None:
            self._fault_reset.cancel()

        async def reset() -> None:
            await asyncio.sleep(after_wall_s)
            await self.apply_faults(faults)

        self._fault_reset = asyncio.create_task(reset())

    def state(self) -> dict[str, Any]:
        return {
            "replica": self.address,
            "model": self.settings.model_name,
            "draining": self.draining,
            "in_flight": self.in_flight,
            "node": self.settings.node,
            "cross_node_requests": self.cross_node_requests,
            "faults": self.faults.current.as_dict(),
            "ranks": [
                {
                    "rank": local,
                    "engine": runner.global_rank,
                    "running": runner.engine.num_running,
                    "waiting": runner.engine.num_waiting,
                    "kv_cache_usage": runner.engine.kv_cache_usage,
                    "max_num_seqs": self.engine_settings.max_num_seqs,
                    "slowdown": self.faults.current.slowdown_of(local),
                }
                for local, runner in enumerate(self.runners)
            ],
        }

    async def _state(self, _request: web.Request) -> web.StreamResponse:
        return web.json_response(self.state())

    async def _steps(self, _request: web.Request) -> web.StreamResponse:
        steps: list[list[float]] = []
        for runner in self.runners:
            steps.extend([planned, late] for planned, late in runner.step_log)
            runner.step_log.clear()
        return web.json_response({
            "replica": self.address,
            "time_scale": self.clock.time_scale,
            "steps": steps,
        })


def _reason(reason: FinishReason | None) -> str:
    return (reason or FinishReason.ABORT).value


def _check_slow_rank(faults: Faults, num_ranks: int) -> None:
    if faults.slow_rank >= num_ranks:
        raise ValueError(f"slow_rank {faults.slow_rank} is not one of the {num_ranks} ranks")


def _error(status: int, message: str, kind: str, *,
           headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(message, status=status, kind=kind), status=status,
                             headers=headers)
