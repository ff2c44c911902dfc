"""The endpoint picker's decision: pure functions, no I/O, no protobuf.

What a request tells the picker (`read_request`) and which replica it goes to (`pick`).
The score of a replica is its expected wait in service times, from the load model the
weight policy uses too (policy/load.py: 0 while a slot is free, plus a hundredth of the load
per slot), with the room per rank read from the replicas that have requests waiting
(`max_num_seqs` only while none has):

    wait     = expected_wait(running, waiting, capacity, slots, pending)
    score    = wait
               - affinity_bonus   if the request's leading block was last sent there and
                                  that replica's wait is below room_threshold (its KV cache
                                  likely still holds the prefix)
               - locality_bonus   if the replica is on the node of the Envoy that asks (a
                                  hop's worth of wait: local wins while it has room, as
                                  the keep shares decide)

`pending` counts this picker's own picks that the latest load reading cannot yet include
(vLLM's internal balancer counts its own picks the same way). Lowest score wins; ties go to
the lexically first address, so that two pickers with the same state agree.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from xds_server.policy.load import expected_wait, slots_now


@dataclass(frozen=True)
class PickSettings:
    """Tunables of the picker; each is a flag of `hybridlb extproc` and `serve`."""

    #: Room per rank until a replica with requests waiting shows the real one (load.py).
    max_num_seqs: int = 256
    #: Score bonus (in units of a replica's room) for the replica that last took the prefix.
    affinity_bonus: float = 0.15
    #: Above this wait a replica gets no affinity bonus: a warm cache is not worth a queue.
    room_threshold: float = 0.7
    #: Score bonus for a replica on the asking Envoy's own node.
    locality_bonus: float = 0.05
    #: Characters of the prompt that make up its leading block (about 64 tokens).
    prefix_chars: int = 256
    #: Bodies larger than this are not parsed (the request passes through to the weights).
    #: Below Envoy's per-connection buffer limit (1 MiB), which the picker asks Envoy to
    #: buffer bodies of this size or less in.
    max_body_bytes: int = 1_000_000


@dataclass(frozen=True)
class Candidate:
    address: str
    node: str
    capacity: int
    running: float
    waiting: float
    pending: int = 0


@dataclass(frozen=True)
class RequestInfo:
    model: str
    prompt_chars: int
    #: Hash of the prompt's leading block; empty when the prompt is shorter than one block.
    prefix: str


class Unreadable(ValueError):
    """The body cannot be used; `reason` is the counter label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def read_request(body: bytes, content_type: str, settings: PickSettings) -> RequestInfo:
    """The model, the prompt's length and its leading block from an OpenAI-style body."""
    if "json" not in content_type.lower():
        raise Unreadable("not_json", f"content type {content_type!r}")
    if len(body) > settings.max_body_bytes:
        raise Unreadable("too_large", f"{len(body)} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # deep nesting: RecursionError
        raise Unreadable("bad_json", str(exc)[:200]) from exc
    if not isinstance(doc, dict):
        raise Unreadable("bad_json", "the body is not a JSON object")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise Unreadable("no_model", "no 'model' string")
    text = _prompt_text(doc)
    leading = text[: settings.prefix_chars]
    prefix = (
        hashlib.blake2b(leading.encode(errors="surrogatepass"), digest_size=8).hexdigest()
        if len(leading) == settings.prefix_chars
        else ""
    )
    return RequestInfo(model=model, prompt_chars=len(text), prefix=prefix)


def _prompt_text(doc: dict[str, object]) -> str:
    """Chat messages' text joined in order, or a completion's prompt."""
    messages = doc.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):  # content parts: keep the text ones
                parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
        return "\n".join(parts)
    prompt = doc.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return str(prompt[0])
    return ""


def wait(c: Candidate, slots: float) -> float:
    return expected_wait(c.running, c.waiting, c.capacity, slots, c.pending)


def pick(
    candidates: list[Candidate],
    *,
    prefix_owner: str | None,
    envoy_node: str,
    settings: PickSettings,
) -> Candidate | None:
    """The candidate with the lowest score (see the module docstring); None if none."""
    best: tuple[float, str] | None = None
    chosen: Candidate | None = None
    slots = slots_now(((c.running, c.waiting, c.capacity) for c in candidates),
                      settings.max_num_seqs)
    for c in candidates:
        w = wait(c, slots)
        score = w
        if prefix_owner == c.address and w < settings.room_threshold:
            score -= settings.affinity_bonus
        if envoy_node and c.node == envoy_node:
            score -= settings.locality_bonus
        key = (score, c.address)
        if best is None or key < best:
            best, chosen = key, c
    return chosen
