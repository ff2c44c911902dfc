"""SIGTERM on a real `python -m xds_server.sim` process: readiness fails, new requests are
refused, the request in flight finishes, the process exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import aiohttp
import yaml

MODEL = "Qwen/Qwen3-0.6B"


async def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    pools = tmp_path / "pools.yaml"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xds_server.sim", "--log-level", "WARNING",
        "--port", "0", "--replicas", "2", "--ranks", "2", "--nodes", "2",
        "--time-scale", "0.5", "--step-base-s", "0.01", "--pools-out", str(pools),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            ready = (await process.stdout.readline()).decode()
        assert ready.startswith("hybridlb sim: ready on "), ready
        addresses = ready.split(" on ", 1)[1].strip().split(", ")
        replicas = yaml.safe_load(pools.read_text())["pools"][0]["replicas"]
        assert [r["address"] for r in replicas] == addresses
        assert [(r["node"], r["capacity"]) for r in replicas] == [("node-a", 2), ("node-b", 2)]
        url = f"http://{addresses[0]}"

        async with aiohttp.ClientSession() as session:
            body = {"model": MODEL, "prompt": "hello", "max_tokens": 100, "ignore_eos": True,
                    "stream": True}
            async with session.post(f"{url}/v1/completions", json=body) as stream:
                assert stream.status == 200
                first = await stream.content.readline()
                assert first.startswith(b"data: ")
                process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(10):
                    while True:
                        async with session.get(f"{url}/health") as health:
                            if health.status == 503:
                                break
                        await asyncio.sleep(0.01)
                refused = {"model": MODEL, "prompt": "late", "max_tokens": 1}
                async with session.post(f"{url}/v1/completions", json=refused) as late:
                    assert late.status == 503
                rest = (await stream.content.read()).decode()
            events = [line[len("data: "):] for line in (first.decode() + rest).splitlines()
                      if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks).count(" ") == 100
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        async with asyncio.timeout(20):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
