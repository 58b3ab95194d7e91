from __future__ import annotations

import math

import pytest
import torch

from riskva_core.evaluate.confidence import level_confidence, level_token_ids

LEVEL_IDS = {"轻微": [3, 4], "中等": [5], "严重": [6, 7]}
KEY = [1, 2]


def logits_row(probs: dict[int, float], vocab: int = 10) -> torch.Tensor:
    """A logits row whose softmax is ``probs`` (the rest of the mass spread over the other tokens)."""
    rest = (1.0 - sum(probs.values())) / (vocab - len(probs))
    p = torch.full((vocab,), rest)
    for token, value in probs.items():
        p[token] = value
    return torch.log(p) + 3.0  # a constant shift: softmax is unchanged


def test_confidence_is_the_written_levels_share_of_the_three_after_the_key():
    generated = [8, 6, 9, 1, 2, 6, 7, 0]  # "严重" once inside the text, then the key, then the level
    steps = torch.stack([logits_row({}) for _ in generated])
    steps[5] = logits_row({3: 0.1, 5: 0.2, 6: 0.5})
    got = level_confidence(steps, torch.tensor(generated), LEVEL_IDS, key_ids=KEY)
    assert got is not None and got.level == "严重" and got.position == 5
    assert math.isclose(got.confidence, 0.5 / 0.8, rel_tol=1e-5)
    assert math.isclose(got.mass, 0.8, rel_tol=1e-5)
    assert math.isclose(sum(got.probabilities.values()), 1.0, rel_tol=1e-6)
    assert math.isclose(got.probabilities["轻微"], 0.125, rel_tol=1e-5)


def test_without_the_key_the_first_level_written_counts_and_no_level_gives_none():
    generated = [8, 5, 9]
    steps = torch.stack([logits_row({}), logits_row({3: 0.3, 5: 0.3, 6: 0.3}), logits_row({})])
    got = level_confidence(steps, generated, LEVEL_IDS, key_ids=KEY)  # key absent: search from the start
    assert got.level == "中等" and got.position == 1 and math.isclose(got.confidence, 1 / 3, rel_tol=1e-5)
    assert level_confidence(steps, [8, 9, 0], LEVEL_IDS) is None


def test_levels_sharing_a_first_token_or_short_logits_are_refused():
    steps = torch.zeros(3, 10)
    with pytest.raises(ValueError, match="first token"):
        level_confidence(steps, [5, 5, 5], {"轻微": [5, 4], "中等": [5], "严重": [6]})
    with pytest.raises(ValueError, match="steps"):
        level_confidence(torch.zeros(2, 10), [5, 5, 5], LEVEL_IDS)


def test_level_token_ids_encode_each_level_without_special_tokens():
    class Tokenizer:
        def encode(self, text, add_special_tokens=True):
            return ([0] if add_special_tokens else []) + [ord(c) for c in text]

    ids = level_token_ids(Tokenizer())
    assert ids == {"轻微": [ord("轻"), ord("微")], "中等": [ord("中"), ord("等")], "严重": [ord("严"), ord("重")]}


def test_the_logits_processor_keeps_four_columns_a_step_and_gives_the_same_confidence():
    from riskva_core.evaluate.confidence import LevelScores

    generated = [8, 6, 9, 1, 2, 6, 7, 0]
    steps = torch.stack([logits_row({}) for _ in generated])
    steps[5] = logits_row({3: 0.1, 5: 0.2, 6: 0.5})
    scores = LevelScores(LEVEL_IDS)
    for i in range(len(generated)):  # generate() calls it once per step with [batch, vocab] scores
        row = steps[i][None].repeat(2, 1)
        assert torch.equal(scores(torch.zeros(2, 1, dtype=torch.long), row), row)  # never changes them
    assert torch.stack(scores.steps, dim=1).shape == (2, len(generated), 4)
    new = torch.tensor([generated, [8, 8, 8, 8, 8, 8, 8, 8]])
    got = scores.confidences(new, KEY)
    assert math.isclose(got[0], 0.5 / 0.8, rel_tol=1e-4) and got[1] is None
    scores.reset()
    assert scores.confidences(new, KEY) == [None, None]
