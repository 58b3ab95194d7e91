"""How evaluation decodes: greedy, one beam, and nothing else unless it was asked for.

A released base model's ``generation_config`` carries sampling knobs and, for
Qwen2.5-VL-7B-Instruct, ``repetition_penalty=1.05``. Training never used a repetition penalty,
and it changes which token wins even under greedy decoding, so evaluation drops it unless
``--repetition_penalty`` is set. ``generation_settings`` is what every report records.
"""
from __future__ import annotations

import copy
from typing import Any

from riskva_core.errors import RiskvaError

# One default for offline inference (`riskva infer`, evaluation) and serving (a registered
# version's model_config): 8 photos of ~1000 image tokens per generate batch fit beside a bf16 7B on
# a 24 GB GPU (KV cache ~75 MB per photo), and a server batches concurrent requests up to it.
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 256


def check_penalty(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise RiskvaError(f"--repetition_penalty must be > 0, got {value}")
    return None if value is None else float(value)


def generation_settings(max_new_tokens: int, repetition_penalty: float | None, seed: int) -> dict[str, Any]:
    """The decoding settings ``greedy_config`` applies, as recorded in reports."""
    return {"do_sample": False, "num_beams": 1, "max_new_tokens": int(max_new_tokens),
            "repetition_penalty": float(repetition_penalty or 1.0),
            "repetition_penalty_source": "set" if repetition_penalty is not None else "default (none)",
            "seed": int(seed)}


def greedy_config(base: Any, max_new_tokens: int, repetition_penalty: float | None, pad_token_id: int | None) -> Any:
    """A copy of the model's GenerationConfig that decodes greedily with only the settings asked for."""
    gc = copy.deepcopy(base)
    # Drop the sampling knobs a released config may carry (Qwen ships top_k/top_p/temperature),
    # so generate() neither samples nor warns about unused settings.
    gc.do_sample = False
    gc.num_beams = 1
    gc.temperature = None
    gc.top_p = None
    gc.top_k = None
    gc.repetition_penalty = repetition_penalty or 1.0
    gc.no_repeat_ngram_size = 0
    gc.max_new_tokens = int(max_new_tokens)
    if gc.pad_token_id is None:
        gc.pad_token_id = pad_token_id
    return gc
