"""An endpoint that answers a streamed completion at once: `python -m ... instant PORT`.

The routing benchmark replays its schedule against this to measure what the load generator
itself adds to TTFT and end-to-end latency on this machine (BENCH.md rule 7). It runs in its
own process, as the Envoys and simulators do, so the client's event loop is measured alone.
"""

from __future__ import annotations

import sys

from aiohttp import web

_BODY = (b'data: {"choices":[{"index":0,"text":"Hi","finish_reason":"length"}]}\n\n'
         b"data: [DONE]\n\n")


async def _complete(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "x-hybridlb-replica": request.host})
    await response.prepare(request)
    await response.write(_BODY)
    await response.write_eof()
    return response


async def _health(_request: web.Request) -> web.Response:
    return web.Response()


def main(argv: list[str]) -> None:
    app = web.Application()
    app.router.add_post("/v1/completions", _complete)
    app.router.add_get("/health", _health)
    web.run_app(app, host="127.0.0.1", port=int(argv[0]), print=None)


if __name__ == "__main__":
    main(sys.argv[1:])
