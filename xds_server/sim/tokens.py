"""Token counting and text generation without a tokenizer.

The simulator only needs token *counts* that are stable and cheap, not a real vocabulary:
downloading a tokenizer would make the tests depend on the network. The rule is the usual
rough figure for English text with BPE tokenizers, about four characters per token.

- a text prompt counts `ceil(len(text) / 4)` tokens, at least 1;
- a prompt given as a list of token ids counts one token per id (exact control for benchmarks);
- a chat counts its messages' contents by the text rule plus `CHAT_TOKENS_PER_MESSAGE`
  for the role markers a chat template adds, plus `CHAT_TOKENS_PER_REPLY` for the assistant
  header, mirroring how chat templates wrap each turn.

Generated text is made of 4-character pieces (" sim", " lab", ...), so counting the output
by the same rule gives back the number of tokens generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CHARS_PER_TOKEN = 4
CHAT_TOKENS_PER_MESSAGE = 4
CHAT_TOKENS_PER_REPLY = 3

_WORDS = (" sim", " lab", " gpu", " dat", " kvc", " rnk", " vlm", " tok")


def count_text_tokens(text: str) -> int:
    """Tokens in a text by the 4-characters rule (at least one)."""
    return max(1, -(-len(text) // CHARS_PER_TOKEN))


def count_prompt_tokens(prompt: str | Sequence[int]) -> int:
    """Tokens in a completions prompt: text by the rule, token ids one each."""
    if isinstance(prompt, str):
        return count_text_tokens(prompt)
    return max(1, len(prompt))


def _content_text(content: Any) -> str:
    # OpenAI content is a string or a list of parts; only text parts carry tokens here.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict)
        )
    return ""


def count_chat_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """Tokens in a chat prompt: contents by the rule plus per-message template overhead."""
    total = CHAT_TOKENS_PER_REPLY
    for message in messages:
        text = _content_text(message.get("content"))
        total += CHAT_TOKENS_PER_MESSAGE + (count_text_tokens(text) if text else 0)
    return total


def token_text(index: int) -> str:
    """The text of the `index`-th generated token (4 characters)."""
    return _WORDS[index % len(_WORDS)]
