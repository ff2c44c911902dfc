"""The publisher: a reading that moves no published weight builds nothing, yet is explained."""

from __future__ import annotations

import time

from xds_server.metrics import Metrics
from xds_server.model import Load, Pool, Replica
from xds_server.policy.weights import PolicySettings
from xds_server.publisher import Publisher
from xds_server.settings import EnvoySettings
from xds_server.state import State
from xds_server.xds.cache import SnapshotCache

A = Replica("10.0.0.1", 8000, "node-a")


def test_a_reading_inside_the_deadband_builds_nothing_but_is_explained() -> None:
    state, cache = State(), SnapshotCache()
    publisher = Publisher(state=state, cache=cache, metrics=Metrics(), settings=EnvoySettings(),
                          policy=PolicySettings(max_num_seqs=100, smoothing_s=0,
                                                max_step_per_s=0, deadband=0.2,
                                                model="queue"))
    state.set_pools("test", [Pool("p", (A,))])
    state.set_loads({A.address: Load(running=10, waiting=0, read_at=time.time())})
    assert publisher.publish_now()
    version = cache.version
    state.set_loads({A.address: Load(running=12, waiting=0, read_at=time.time())})
    assert not publisher.publish_now()
    assert cache.version == version
    assert publisher.published.explain["p"][A.address].utilization == 0.12
    state.set_loads({A.address: Load(running=50, waiting=0, read_at=time.time())})
    assert publisher.publish_now()
    assert cache.version == version + 1
