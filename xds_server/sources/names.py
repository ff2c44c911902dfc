"""What a pool name may be, for every source (pool file, pod metadata, config, CRDs).

Model names often carry a slash ("Qwen/Qwen3-0.6B") or a colon; spaces and quotes never help
(the name travels in a request header and in Envoy resource names).
"""

from __future__ import annotations

import re

_POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")


def valid_pool_name(name: str) -> bool:
    return bool(_POOL_NAME.match(name))
