"""A vLLM server simulator: stands in for GPUs in the demo, the tests and the benchmarks.

`engine` is the pure scheduler model (no I/O, testable with simulated time), `runner` drives
it against a clock, `server` is the aiohttp glue that speaks vLLM's OpenAI-compatible API,
and `cli` turns `hybridlb sim` arguments into running servers.
"""
