"""vLLM Hybrid LB: an xDS control plane that balances vLLM data-parallel replicas through Envoy.

Two layers. The runtime, what a production pod runs (`pip install vllm-hybrid-lb`): `cli`,
`commands/`, `app`, `settings`, `sources/`, `state`, `policy/`, `publisher`, `xds/`,
`extproc/`, `admin`, `metrics`, `model`, `addresses`, `tls`, `logsafe`. The tools around
it, behind extras: `sim/` (a vLLM simulator), `workload` (a traffic generator), `demo/`,
`bench/`, and `ports` (free ports for the processes they start). Tools import the runtime,
never the reverse (tests/unit/test_layers.py).
"""

__version__ = "0.1.0"
