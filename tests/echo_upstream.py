"""Echo servers on the given ports that say who answered: the xDS tests' upstreams.

(The vLLM simulator stands in for GPUs where request timing matters; routing tests only
need to see where Envoy sent each request.)
"""

import asyncio
import sys

from aiohttp import web


async def main(ports: list[int]) -> None:
    runners = []
    for port in ports:
        identity = f"127.0.0.1:{port}"

        async def handle(request: web.Request, identity: str = identity) -> web.Response:
            return web.Response(text=f"{identity}\n", headers={"x-hybridlb-replica": identity})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main([int(p) for p in sys.argv[1:]]))
