"""How evaluation decodes: greedy, one beam, and nothing else unless it was asked for.

A released base model's ``generation_config`` carries sampling knobs and, for
Qwen2.5-VL-7B-Instruct, ``repetition_penalty=1.05``. Training never used a repetition penalty,
and it changes which token wins even under greedy decoding, so evaluation drops it unless
``--repetition_penalty`` is set. ``generation_settings`` is what every report records.
"""
from __future__ import annotations

import copy
import dataclasses
import secrets
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


@dataclasses.dataclass(frozen=True)
class Decoding:
    """One request's decoding settings, with vLLM's OpenAI-server meanings; the default is
    evaluation's greedy decoding.

    ``max_new_tokens`` caps the answer (None: the model's own cap, which also bounds any
    request); ``temperature`` 0 is greedy (top_p then has no effect), above 0 samples with
    ``top_p`` nucleus filtering; ``seed`` seeds torch before the batch (an unseeded sampled
    request gets a fresh random seed, as vLLM's default); ``stop`` strings end the answer before
    the first of them (not included).
    """

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise RiskvaError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise RiskvaError(f"temperature must be 0..2, got {self.temperature!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise RiskvaError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2 ** 63):
            raise RiskvaError(f"seed must be an integer 0..2**63-1, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RiskvaError(f"stop must be non-empty strings, got {list(self.stop)!r}")

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> "Decoding":
        """From MLflow inference ``params`` (the pyfunc's ParamSchema: None means the default)."""
        p = {k: v for k, v in (params or {}).items() if v is not None}
        return cls(max_new_tokens=None if p.get("max_new_tokens") is None else int(p["max_new_tokens"]),
                   temperature=float(p.get("temperature", 0.0)), top_p=float(p.get("top_p", 1.0)),
                   seed=None if p.get("seed") is None else int(p["seed"]), stop=tuple(p.get("stop") or ()))

    def params(self) -> dict[str, Any]:
        """As MLflow inference ``params`` (what ``from_params`` reads back)."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": float(self.temperature),
                "top_p": float(self.top_p), "seed": self.seed, "stop": list(self.stop)}

    def cap(self, model_max: int) -> int:
        return min(self.max_new_tokens or model_max, model_max)

    def config(self, greedy: Any, model_max: int) -> Any:
        """A copy of ``greedy`` (``greedy_config``'s result) with this request's cap and sampling."""
        gc = copy.deepcopy(greedy)
        gc.max_new_tokens = self.cap(model_max)
        if self.sampled:
            gc.do_sample, gc.temperature = True, float(self.temperature)
            gc.top_p = float(self.top_p) if self.top_p < 1 else None  # top_k stays off, as vLLM's default
        return gc

    def run_seed(self, default: int) -> int:
        """The torch seed of the batch: the request's; for unseeded sampling a fresh one; else ``default``."""
        if self.seed is not None:
            return self.seed
        return secrets.randbelow(2 ** 63) if self.sampled else default


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop string, and whether one occurred."""
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return (text[:min(hits)], True) if hits else (text, False)
