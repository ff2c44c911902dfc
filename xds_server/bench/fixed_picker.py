"""An endpoint picker that decides nothing: its first answer, replayed for every request.

`hybridlb bench extproc` runs it beside the real picker, behind a third Envoy, to tell the
cost of the exchange itself (Envoy's ext_proc filter, gRPC, the two messages per request)
from the cost of the decision (parsing the body, scoring the replicas). It speaks the real
protocol (headers, then the buffered body), so Envoy does exactly the same work.

    python -m xds_server.bench.fixed_picker PORT CONTROL_PLANE_ADMIN_URL
"""

from __future__ import annotations

import asyncio
import sys

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from xds_server.extproc.server import Picker, StreamState, add_to_server
from xds_server.extproc.state import RemoteState
from xds_server.metrics import Metrics
from xds_server.settings import PickSettings


class ReplayingPicker(Picker):
    """The real picker's first pick, then the same answer without looking at the body."""

    _answer: list[ep.ProcessingResponse] | None = None

    def _on_body(self, body: ep.HttpBody, s: StreamState) -> list[ep.ProcessingResponse]:
        if self._answer is None:
            self._answer = super()._on_body(body, s)
        return self._answer


async def serve(port: int, control_plane: str) -> None:
    import grpc

    state = RemoteState(control_plane, interval_s=0.5)
    follow = asyncio.create_task(state.run())
    await state.ready.wait()
    server = grpc.aio.server()
    add_to_server(server, ReplayingPicker(state=state, metrics=Metrics(),
                                          settings=PickSettings()))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        await server.wait_for_termination()
    finally:
        follow.cancel()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2]))
