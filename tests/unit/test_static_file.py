"""The static pool file: the documented format, clear errors, last good state kept."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from xds_server.metrics import Metrics
from xds_server.model import Replica
from xds_server.sources.static_file import PoolFileError, StaticFileSource, parse_pools
from xds_server.state import State

GOOD = """
pools:
  - name: qwen3              # the model / pool name
    replicas:
      - address: 127.0.0.1:8001
        node: node-a
        capacity: 2
      - address: "[::1]:8002"
        node: node-b
        zone: z1
        max_num_seqs: 64
  - name: Qwen/Qwen3-0.6B
    replicas: []
"""


def test_documented_format_parses() -> None:
    qwen, other = parse_pools(GOOD)
    assert qwen.name == "qwen3"
    assert qwen.replicas == (
        Replica(host="127.0.0.1", port=8001, node="node-a", capacity=2),
        Replica(host="::1", port=8002, node="node-b", zone="z1", max_num_seqs=64),
    )
    assert qwen.replicas[1].address == "[::1]:8002"
    assert qwen.nodes == ("node-a", "node-b")
    assert other.name == "Qwen/Qwen3-0.6B" and other.replicas == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pools: [", "not valid YAML"),
        ("[]", "expected a mapping with a 'pools' list"),
        ("pools:\n  - replicas: []", "pools[0].name"),
        ("pools:\n  - {name: a}\n  - {name: a}", "appears twice"),
        ("pools:\n  - {name: a, replica: []}", "unknown key(s) replica"),
        ("pools:\n  - {name: a, replicas: [{address: x, node: n}]}",
         "pools[0].replicas[0].address"),
        ("pools:\n  - {name: a, replicas: [{address: '1.2.3.4:0', node: n}]}", "out of range"),
        ("pools:\n  - {name: a, replicas: [{address: '1.2.3.4:1'}]}", "replicas[0].node"),
        ("pools:\n  - {name: a, replicas: [{address: '1.2.3.4:1', node: n, capacity: 0}]}",
         "capacity"),
        ("pools:\n  - {name: a, replicas: [{address: '1.2.3.4:1', node: n, capacity: two}]}",
         "capacity"),
        ("pools:\n  - {name: a, replicas: [{address: '1.2.3.4:1', node: n, max_num_seqs: 0}]}",
         "max_num_seqs: 0 is not an integer"),
        ("pools:\n  - name: a\n    replicas:\n      - {address: '1.2.3.4:1', node: n}\n"
         "      - {address: '1.2.3.4:1', node: m}", "1.2.3.4:1 appears twice"),
    ],
)
def test_bad_files_say_where_and_why(text: str, message: str) -> None:
    with pytest.raises(PoolFileError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)").replace("]", r"\]")):
        parse_pools(text)


async def test_broken_edit_keeps_last_good_pools_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text(GOOD)
    state, metrics = State(), Metrics()
    source = StaticFileSource(path=path, state=state, metrics=metrics, poll_interval_s=0.01)
    source.load_once()
    good = state.pools
    task = asyncio.create_task(source.run())
    try:
        path.write_text("pools: [")
        async with asyncio.timeout(5):
            while not metrics.registry.get_sample_value(
                    "hybridlb_source_errors_total", {"source": "static", "reason": "invalid"}):
                await asyncio.sleep(0.01)
        assert state.pools == good
        path.write_text("pools:\n  - {name: b, replicas: [{address: '10.0.0.1:80', node: n}]}")
        async with asyncio.timeout(5):
            while state.pools == good:
                await asyncio.sleep(0.01)
        assert [p.name for p in state.pools] == ["b"]
    finally:
        task.cancel()


class HalfWrittenPath(type(Path())):  # type: ignore[misc]
    """A file an editor rewrites in place: the first read after the edit sees a prefix."""

    prefix = b""

    def read_bytes(self) -> bytes:
        data, self.prefix = self.prefix, b""
        return data or super().read_bytes()


@pytest.mark.parametrize("cut", [
    "pools:\n  - {name: b, re",  # not YAML yet: must not count as a broken file
    "pools:\n  - {name: b, replicas: [{address: '10.0.0.1:80', node: n}]}\n",  # valid, short
])
async def test_a_half_written_edit_is_not_judged(tmp_path: Path, cut: str) -> None:
    path = HalfWrittenPath(tmp_path / "pools.yaml")
    path.write_text(GOOD)
    state, metrics = State(), Metrics()
    source = StaticFileSource(path=path, state=state, metrics=metrics, poll_interval_s=0.01)
    source.load_once()
    applied: list[list[str]] = []
    set_pools = state.set_pools
    state.set_pools = lambda name, pools: (  # type: ignore[method-assign]
        applied.append([r.address for p in pools for r in p.replicas]) or set_pools(name, pools))
    full = cut.rstrip("\n") + "\n  - {name: c, replicas: [{address: '10.0.0.2:80', node: n}]}\n"
    task = asyncio.create_task(source.run())
    try:
        await asyncio.sleep(0.05)  # the source has read GOOD twice: settled
        path.prefix = cut.encode()
        path.write_text(full if cut.endswith("\n") else cut + "plicas: []}\n")
        async with asyncio.timeout(5):
            while not applied:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
    finally:
        task.cancel()
    assert not metrics.registry.get_sample_value(
        "hybridlb_source_errors_total", {"source": "static", "reason": "invalid"})
    assert len(applied) == 1  # only the finished file, never its prefix
    assert [p.name for p in state.pools] == (["b", "c"] if cut.endswith("\n") else ["b"])
