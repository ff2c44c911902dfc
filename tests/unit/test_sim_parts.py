"""The simulator's small pure parts: DP balancer, token rule, faults, pool file, CLI."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pytest
import yaml

from xds_server.sim import cli
from xds_server.sim.balancer import DPBalancer
from xds_server.sim.faults import Faults
from xds_server.sim.host import HostSettings, SimHost, node_name, pools_yaml
from xds_server.sim.tokens import count_chat_tokens, count_prompt_tokens, token_text


class Counts:
    """Live [waiting, running] counts a test can change between picks."""

    def __init__(self, counts: Sequence[tuple[int, int]]) -> None:
        self.counts = list(counts)
        self.reads = 0

    def __call__(self) -> list[tuple[int, int]]:
        self.reads += 1
        return list(self.counts)


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ([(0, 0), (0, 0)], 0),
        ([(0, 5), (0, 1)], 1),
        # one waiting request weighs as much as four running ones
        ([(1, 0), (0, 3)], 1),
        ([(1, 0), (0, 4)], 0),
        ([(2, 10), (3, 0), (0, 9)], 2),
    ],
)
def test_balancer_picks_lowest_waiting_times_four_plus_running(
    counts: list[tuple[int, int]], expected: int
) -> None:
    balancer = DPBalancer(num_engines=len(counts), read_counts=Counts(counts),
                          stats_interval_s=0.0)
    assert balancer.pick(0.0) == expected


def test_balancer_rotates_its_start_so_ties_spread() -> None:
    balancer = DPBalancer(num_engines=3, read_counts=Counts([(0, 0)] * 3), stats_interval_s=0.0)
    assert [balancer.pick(float(t)) for t in range(6)] == [0, 1, 2, 0, 1, 2]


def test_balancer_counts_its_own_picks_between_stat_updates() -> None:
    counts = Counts([(0, 0), (0, 0)])
    balancer = DPBalancer(num_engines=2, read_counts=counts, stats_interval_s=0.1)
    picks = [balancer.pick(0.0) for _ in range(4)]
    # a burst inside one stats interval still spreads evenly, from one snapshot
    assert sorted(picks) == [0, 0, 1, 1]
    assert counts.reads == 1


def test_balancer_acts_on_stale_counts_until_the_interval_passes() -> None:
    counts = Counts([(0, 0), (0, 0)])
    balancer = DPBalancer(num_engines=2, read_counts=counts, stats_interval_s=0.1)
    balancer.pick(0.0)  # engine 0, snapshot taken
    counts.counts = [(0, 0), (50, 50)]
    balancer.pick(0.05)  # engine 1: the balancer has not seen the new counts
    assert balancer.pick(0.05) == 0
    assert counts.reads == 1
    assert balancer.pick(0.2) == 0 and counts.reads == 2
    assert balancer.pick(0.3) == 0  # after a refresh, engine 1 is avoided


@pytest.mark.parametrize(
    ("prompt", "tokens"),
    [("", 1), ("abc", 1), ("abcd", 1), ("abcde", 2), ("x" * 2048, 512), ([1, 2, 3], 3)],
)
def test_prompt_tokens_are_four_characters_each(prompt: str | list[int], tokens: int) -> None:
    assert count_prompt_tokens(prompt) == tokens


def test_chat_tokens_add_template_overhead_per_message() -> None:
    one = count_chat_tokens([{"role": "user", "content": "x" * 40}])
    two = count_chat_tokens([{"role": "system", "content": "x" * 40},
                             {"role": "user", "content": [{"type": "text", "text": "x" * 40}]}])
    assert one == 3 + 4 + 10
    assert two == 3 + 2 * (4 + 10)


def test_generated_text_counts_back_to_the_tokens_generated() -> None:
    text = "".join(token_text(i) for i in range(37))
    assert count_prompt_tokens(text) == 37


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"slowdown": 3}, Faults(slowdown=3.0)),
        ({"error_rate": 0.2, "hang": True}, Faults(error_rate=0.2, hang=True)),
        ({"refuse": False}, Faults()),
        ({"slowdown": 3, "slow_rank": 1}, Faults(slowdown=3.0, slow_rank=1)),
    ],
)
def test_faults_update_named_fields(changes: dict[str, object], expected: Faults) -> None:
    assert Faults().updated(changes) == expected


@pytest.mark.parametrize(
    "changes",
    [{"slowdown": 0}, {"error_rate": 1.5}, {"hang": "yes"}, {"slowdown": True}, {"melt": 1},
     {"slow_rank": -2}, {"slow_rank": 1.5}, {"slow_rank": True}],
)
def test_invalid_faults_are_rejected(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Faults().updated(changes)


def test_a_slow_rank_slows_that_rank_only() -> None:
    one = Faults(slowdown=3.0, slow_rank=1)
    assert [one.slowdown_of(r) for r in range(3)] == [1.0, 3.0, 1.0]
    assert [Faults(slowdown=3.0).slowdown_of(r) for r in range(2)] == [3.0, 3.0]


@pytest.mark.parametrize(("index", "name"), [(0, "node-a"), (25, "node-z"), (26, "node-aa")])
def test_node_names(index: int, name: str) -> None:
    assert node_name(index) == name


@pytest.mark.parametrize(
    ("names", "expected"),
    [((), ["node-a", "node-b", "node-a"]), (("node-c", "node-d"), ["node-c", "node-d", "node-c"])],
)
def test_servers_go_round_robin_over_named_nodes(names: tuple[str, ...],
                                                 expected: list[str]) -> None:
    host = SimHost(HostSettings(replicas=3, nodes=2, node_names=names))
    assert [s.settings.node for s in host.servers] == expected


def test_pool_file_names_each_replicas_node() -> None:
    text = pools_yaml(pool_name="qwen3", addresses=["127.0.0.1:8001", "127.0.0.1:8002",
                                                    "127.0.0.1:8003"],
                      nodes=["node-a", "node-b", "node-a"], capacity=2)
    assert text.startswith(
        "pools:\n  - name: qwen3\n    replicas:\n"
        "      - address: 127.0.0.1:8001\n        node: node-a\n        capacity: 2\n"
    )
    parsed = yaml.safe_load(text)
    replicas = parsed["pools"][0]["replicas"]
    assert [r["node"] for r in replicas] == ["node-a", "node-b", "node-a"]
    assert {r["capacity"] for r in replicas} == {2}


def test_cli_turns_flags_into_settings() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--port", "9000", "--replicas", "3", "--ranks", "4",
                              "--start-rank", "8", "--time-scale", "0.1", "--slowdown", "2",
                              "--slow-rank", "3", "--max-num-seqs", "7",
                              "--kv-cache-tokens", "1000"])
    settings = cli.settings_from_args(args)
    assert (settings.replicas, settings.server.num_ranks, settings.server.start_rank) == (3, 4, 8)
    assert settings.time_scale == 0.1 and settings.faults.slowdown == 2.0
    assert settings.faults.slow_rank == 3
    assert settings.engine.max_num_seqs == 7 and settings.engine.kv_cache_tokens == 1000


def test_every_option_documents_its_default() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    help_text = parser.format_help()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert all(action.help for action in options)
    assert help_text.count("(default:") >= len(options)
