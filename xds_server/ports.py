"""Free local ports for the processes the demo, the benchmarks and the tests start.

Ports come from the OS (bind to 0), never from a fixed range, so that two demos, or a demo
and the tests, can run on one machine at once.
"""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (bound together, so never the same)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
