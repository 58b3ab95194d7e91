"""Token counts of a generate batch, as OpenAI's ``usage`` reports them (served with each answer)."""
from __future__ import annotations

from typing import Any


def token_usage(attention_mask: Any, new_tokens: Any, eos: int | list[int] | None) -> list[dict[str, int]]:
    """Per row: the prompt's tokens without padding, and the generated tokens up to and including
    the first end-of-sequence token (what follows it in a batch is padding)."""
    ends = {eos} if isinstance(eos, int) else set(eos or ())
    completion = [next((k + 1 for k, token in enumerate(row) if token in ends), len(row)) for row in new_tokens.tolist()]
    return [{"prompt_tokens": int(p), "completion_tokens": int(c)}
            for p, c in zip(attention_mask.sum(dim=1).tolist(), completion)]
