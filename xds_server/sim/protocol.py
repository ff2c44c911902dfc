"""vLLM's OpenAI-compatible wire shapes: request parsing and response bodies.

Kept apart from the aiohttp glue so the shapes can be read (and checked) in one place. They
follow vLLM's `vllm/entrypoints/openai/protocol.py`: ids `cmpl-<hex>` and `chatcmpl-<hex>`,
`stop_reason` beside `finish_reason`, streamed chunks without `usage` except a last
`choices: []` chunk when `stream_options.include_usage` is set, and errors as
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from xds_server.sim.tokens import count_chat_tokens, count_prompt_tokens


class RequestError(Exception):
    """A request vLLM would refuse: carries the HTTP status and the error type name."""

    def __init__(self, message: str, *, status: int = 400, kind: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(str(self), status=self.status, kind=self.kind, param=self.param)


def error_body(message: str, *, status: int, kind: str, param: str | None = None
               ) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


@dataclass(frozen=True)
class GenerationRequest:
    """What the simulator needs from a completions or chat request."""

    chat: bool
    model: str
    prompt_tokens: int
    max_tokens: int | None
    ignore_eos: bool
    stream: bool
    include_usage: bool


def _optional_int(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RequestError(f"{name} must be at least 1, got {value!r}.", param=name)
        return value
    return None


def parse_generation(body: Any, *, chat: bool) -> GenerationRequest:
    """Validate a request body the way vLLM's pydantic models would, for the fields used."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("Field required: model", param="model")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise RequestError("Field required: messages", param="messages")
        prompt_tokens = count_chat_tokens(messages)
        max_tokens = _optional_int(body, "max_completion_tokens", "max_tokens")
    else:
        prompt_tokens = _prompt_tokens(body.get("prompt"))
        max_tokens = _optional_int(body, "max_tokens")
    if body.get("n", 1) != 1:
        raise RequestError("The simulator only supports n=1.", param="n")
    stream = bool(body.get("stream", False))
    options = body.get("stream_options") or {}
    if options and not stream:
        raise RequestError("Stream options can only be defined when `stream=True`.")
    return GenerationRequest(
        chat=chat,
        model=model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        ignore_eos=bool(body.get("ignore_eos", False)),
        stream=stream,
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
    )


def _prompt_tokens(prompt: Any) -> int:
    if isinstance(prompt, str):
        return count_prompt_tokens(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return count_prompt_tokens(prompt)
    if isinstance(prompt, list) and len(prompt) == 1:
        return _prompt_tokens(prompt[0])
    if isinstance(prompt, list) and len(prompt) > 1:
        raise RequestError("The simulator only supports one prompt per request.",
                           param="prompt")
    raise RequestError("Field required: prompt (a string or a list of token ids)",
                       param="prompt")


def new_request_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def full_response(
    *, request: GenerationRequest, request_id: str, created: int, text: str,
    completion_tokens: int, finish_reason: str,
) -> dict[str, Any]:
    """The body of a non-streamed response."""
    if request.chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "tool_calls": [],
                "reasoning_content": None,
            },
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
        obj = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        obj = "text_completion"
    body: dict[str, Any] = {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": request.model,
        "choices": [choice],
        "usage": usage(request.prompt_tokens, completion_tokens),
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }
    if request.chat:
        body["service_tier"] = None
        body["system_fingerprint"] = None
    return body


def stream_chunk(
    *, request: GenerationRequest, request_id: str, created: int, text: str | None,
    finish_reason: str | None, role: bool = False,
) -> bytes:
    """One SSE event with a choice delta (`text` None with `role` for chat's opening chunk)."""
    if request.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {
            "content": text}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                  "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = None
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason, "stop_reason": None}
        obj = "text_completion"
    return sse({"id": request_id, "object": obj, "created": created, "model": request.model,
                "choices": [choice]})


def usage_chunk(*, request: GenerationRequest, request_id: str, created: int,
                completion_tokens: int) -> bytes:
    obj = "chat.completion.chunk" if request.chat else "text_completion"
    return sse({"id": request_id, "object": obj, "created": created, "model": request.model,
                "choices": [], "usage": usage(request.prompt_tokens, completion_tokens)})


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def models_body(model: str, max_model_len: int, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": model,
                "parent": None,
                "max_model_len": max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{uuid.uuid4().hex}",
                        "object": "model_permission",
                        "created": created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
        ],
    }


def now_unix() -> int:
    return int(time.time())
