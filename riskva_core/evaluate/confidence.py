"""How sure the model was of the 风险等级 it wrote, from its own next-token probabilities.

At the step where the answer writes the level, the model's distribution over the vocabulary says
how much it preferred each of the three levels. The confidence is the written level's share of
the three levels' first tokens there:

    p(level) = softmax(logits)[first token of level] / sum over the three levels of the same

so it is "of the three answers this field allows, how much weight went to this one", between 1/3
(a coin toss between all three, or lower when the model preferred another level but greedy
decoding was steered elsewhere) and 1. ``mass`` is the three first tokens' share of the whole
distribution: low mass means the model was not even sure a level came next (the field is
malformed, or the parse found the level elsewhere).

Why first tokens: only the written path's later steps are known (greedy generation computes the
distribution after the tokens it chose, not after the alternatives), and the three levels differ
in their first token in every tokenizer RisKVA uses (轻/中/严); levels that share a first token
are refused rather than scored wrongly. Use the raw logits (``generate(..., output_logits=True)``,
one ``[vocab]`` row per generated token) so that no logits processor has reshaped them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch

from riskva_core.schema import LEVELS


@dataclasses.dataclass(frozen=True)
class LevelConfidence:
    level: str  # the level the answer wrote
    confidence: float  # its share of the three levels' probability at that step
    probabilities: dict[str, float]  # every level's share (sums to 1)
    mass: float  # the three levels' share of the whole next-token distribution there
    position: int  # index of the generated token where the level starts


def level_token_ids(tokenizer: Any) -> dict[str, list[int]]:
    """Each level's token ids as the tokenizer writes it (no special tokens)."""
    return {level: list(tokenizer.encode(level, add_special_tokens=False)) for level in LEVELS}


def _find(generated: list[int], pattern: Sequence[int], start: int) -> int | None:
    n = len(pattern)
    for pos in range(max(0, start), len(generated) - n + 1):
        if generated[pos:pos + n] == list(pattern):
            return pos
    return None


def level_confidence(step_logits: torch.Tensor, generated_ids: Sequence[int] | torch.Tensor,
                     level_ids: Mapping[str, Sequence[int]], key_ids: Sequence[int] | None = None,
                     columns: Mapping[str, int] | None = None) -> LevelConfidence | None:
    """The confidence of the first level written after the 风险等级 key (module docstring).

    ``step_logits``: ``[steps, vocab]``, row ``i`` the logits that produced ``generated_ids[i]``.
    ``key_ids``: the key's token ids; the level is searched after its first occurrence (from the
    start when absent), so a level word inside 风险 or 缺陷描述 ("严重锈蚀") is not taken for the
    field when the key is written before it. None when no level was written.
    ``columns``: where each level's first token is in ``step_logits`` when the rows are not the
    whole vocabulary (``LevelScores``' four columns) rather than indexed by token id.
    """
    generated = [int(t) for t in (generated_ids.tolist() if isinstance(generated_ids, torch.Tensor) else generated_ids)]
    if step_logits.dim() != 2 or step_logits.shape[0] < len(generated):
        raise ValueError(f"step_logits must be [steps >= {len(generated)}, vocab], got {tuple(step_logits.shape)}")
    firsts = {level: int(ids[0]) for level, ids in level_ids.items() if len(ids)}
    if len(firsts) != len(level_ids) or len(set(firsts.values())) != len(firsts):
        raise ValueError(f"each level needs its own first token, got {dict(level_ids)}")
    start = 0
    if key_ids:
        at = _find(generated, key_ids, 0)
        start = at + len(key_ids) if at is not None else 0
    hits = [(pos, level) for level, ids in level_ids.items() if (pos := _find(generated, ids, start)) is not None]
    if not hits:
        return None
    position, level = min(hits)
    probs = torch.softmax(step_logits[position].float(), dim=-1)
    order = list(level_ids)
    index = dict(columns) if columns is not None else firsts
    first_p = torch.stack([probs[index[lvl]] for lvl in order])
    mass = float(first_p.sum())
    if mass <= 0.0:
        return None
    shares = (first_p / first_p.sum()).tolist()
    by_level = dict(zip(order, shares))
    return LevelConfidence(level=level, confidence=by_level[level], probabilities=by_level, mass=mass,
                           position=position)


class LevelScores:
    """A logits processor (``generate(..., logits_processor=[...])``) that keeps, per step and row,
    the log-probabilities of the three levels' first tokens plus one "rest" column: four numbers a
    step instead of the vocabulary (``output_logits`` would hold ``steps x vocab`` floats per photo).
    Softmax over the four columns gives back the same shares, so ``level_confidence(...,
    columns=scores.columns)`` reads them as it reads raw logits. It sees the scores after the
    processors before it (a repetition penalty, when set), and never changes them."""

    def __init__(self, level_ids: Mapping[str, Sequence[int]]):
        self.level_ids = {level: list(ids) for level, ids in level_ids.items()}
        firsts = [ids[0] for ids in self.level_ids.values() if ids]
        if len(firsts) != len(self.level_ids) or len(set(firsts)) != len(firsts):
            raise ValueError(f"each level needs its own first token, got {self.level_ids}")
        self.firsts = firsts
        self.columns = {level: i for i, level in enumerate(self.level_ids)}
        self.steps: list[torch.Tensor] = []

    def reset(self) -> None:
        self.steps = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scores.float(), dim=-1)
        firsts = logp[:, self.firsts]
        rest = torch.log1p(-firsts.exp().sum(dim=-1).clamp(max=1 - 1e-7))
        self.steps.append(torch.cat([firsts, rest[:, None]], dim=1).cpu())
        return scores

    def confidences(self, new_tokens: torch.Tensor, key_ids: Sequence[int] | None = None) -> list[float | None]:
        """Per row of ``new_tokens`` (``[batch, steps]``), the written level's confidence, or None."""
        if not self.steps:
            return [None] * int(new_tokens.shape[0])
        table = torch.stack(self.steps, dim=1)  # [batch, steps, 4]
        out: list[float | None] = []
        for row in range(int(new_tokens.shape[0])):
            found = level_confidence(table[row], new_tokens[row][: table.shape[1]], self.level_ids, key_ids,
                                     columns=self.columns)
            out.append(None if found is None else round(found.confidence, 6))
        return out
