"""vLLM Hybrid LB: an xDS control plane that balances vLLM data-parallel replicas through Envoy."""

__version__ = "0.1.0"
