from __future__ import annotations

import hashlib
import json
import random

import pandas as pd
import pytest

from conftest import image_bytes, textured_image
from image_fixtures import burst
from riskva_core.feedback.review_queue import (DRIFTED, LOW_CONFIDENCE, PARSE_FAILURE, RANDOM, Candidate, KnownPhoto,
                                               QueueConfig, build_review_queue, candidates_from_log,
                                               known_from_queues, known_from_split, photo_phash, read_queue,
                                               write_queue)


def photo(index: int) -> bytes:
    return image_bytes(textured_image(index, (96, 72)), "JPEG", quality=92)


def candidate(data: bytes, confidence: float | None = 0.5, parse_ok: bool = True, drifted: bool = False) -> Candidate:
    return Candidate(photo_sha256=hashlib.sha256(data).hexdigest(), photo_path="", phash=photo_phash(data),
                     parse_ok=parse_ok, level_confidence=confidence, drifted=drifted,
                     draft={"风险等级": "中等"})


@pytest.fixture(scope="module")
def pool() -> list[Candidate]:
    return [candidate(photo(i), confidence=c) for i, c in
            enumerate([0.8, 0.3, 0.95, None, 0.5, 0.99, 0.97, 0.92, 0.96, 0.91])]


def test_hard_cases_come_first_parse_failures_then_drifted_then_least_confident(pool):
    failure = candidate(photo(50), parse_ok=False, confidence=None)
    drifted = candidate(photo(51), confidence=0.97, drifted=True)
    queue = build_review_queue([*pool, drifted, failure], [], QueueConfig(size=5, random_share=0.0))
    assert [e.reason for e in queue.entries] == [PARSE_FAILURE, DRIFTED, LOW_CONFIDENCE, LOW_CONFIDENCE, LOW_CONFIDENCE]
    assert [e.candidate.level_confidence for e in queue.entries[2:]] == [None, 0.3, 0.5]  # no confidence counts as 0
    assert [e.rank for e in queue.entries] == list(range(5))
    # a confident answer is never a hard case: with room left, only the random draw takes it
    roomy = build_review_queue(pool, [], QueueConfig(size=10, random_share=0.0))
    assert {e.candidate.level_confidence for e in roomy.entries if e.reason == LOW_CONFIDENCE} == {0.8, 0.3, None, 0.5}
    assert all(e.candidate.level_confidence >= 0.9 for e in roomy.entries if e.reason == RANDOM)


def test_the_random_share_is_seeded_stable_and_recorded(pool):
    config = QueueConfig(size=6, random_share=0.5, seed=7)
    queue = build_review_queue(pool, [], config)
    assert queue.counts()[RANDOM] == 3 and queue.counts()[LOW_CONFIDENCE] == 3
    picked = [e.candidate.photo_sha256 for e in queue.entries if e.reason == RANDOM]
    shuffled = list(pool)
    random.Random(1).shuffle(shuffled)  # the input order does not change the draw
    again = build_review_queue(shuffled, [], config)
    assert [e.candidate.photo_sha256 for e in again.entries if e.reason == RANDOM] == picked
    draws = {tuple(e.candidate.photo_sha256 for e in build_review_queue(pool, [], QueueConfig(6, 0.5, seed=s)).entries
                   if e.reason == RANDOM) for s in range(6)}
    assert len(draws) > 1  # the seed decides
    assert queue.to_dict()["config"]["seed"] == 7 and queue.to_dict()["config"]["random_share"] == 0.5
    # confident answers are in the random draw's reach
    assert any(e.candidate.level_confidence >= 0.9 for e in queue.entries if e.reason == RANDOM)


def test_random_fills_the_queue_when_hard_cases_run_short(pool):
    queue = build_review_queue(pool, [], QueueConfig(size=8, random_share=0.25, seed=0))
    assert len(queue.entries) == 8 and queue.counts()[LOW_CONFIDENCE] == 4 and queue.counts()[RANDOM] == 4


def test_duplicates_of_the_splits_and_of_reviewed_photos_are_skipped():
    train_photo, test_photo, reviewed_photo, fresh = textured_image(1, (96, 72)), photo(2), photo(3), photo(4)
    twin_of_train = burst(train_photo)[2][1]  # brightened 8 %, re-encoded: a near-duplicate
    known = [KnownPhoto(hashlib.sha256(b"x").hexdigest(), photo_phash(image_bytes(train_photo, "JPEG")), "train"),
             KnownPhoto(hashlib.sha256(test_photo).hexdigest(), photo_phash(test_photo), "test"),
             KnownPhoto("f" * 64, photo_phash(reviewed_photo), "reviewed")]
    low, high = burst(textured_image(9, (96, 72)))[0][1], burst(textured_image(9, (96, 72)))[1][1]
    candidates = [candidate(twin_of_train, 0.1), candidate(test_photo, 0.1), candidate(reviewed_photo, 0.1),
                  candidate(fresh, 0.4), candidate(high, 0.6), candidate(low, 0.2), candidate(fresh, 0.4)]
    queue = build_review_queue(candidates, known, QueueConfig(size=10, random_share=0.0))
    assert [e.candidate.photo_sha256 for e in queue.entries] == [hashlib.sha256(low).hexdigest(),
                                                                 hashlib.sha256(fresh).hexdigest()]
    reasons = {s["photo_sha256"]: s["reason"] for s in queue.skipped}
    assert reasons[hashlib.sha256(twin_of_train).hexdigest()].startswith("near-duplicate of a train photo")
    assert reasons[hashlib.sha256(test_photo).hexdigest()] == "the same photo is in test"
    assert reasons[hashlib.sha256(reviewed_photo).hexdigest()].startswith("near-duplicate of a reviewed photo")
    # of two near-identical candidates the one reviewed first (less confident) is kept
    assert reasons[hashlib.sha256(high).hexdigest()].startswith("near-duplicate of a queued photo")


def test_log_rows_become_candidates_and_queues_round_trip(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(photo(i))
        paths.append(str(p))
    frame = pd.DataFrame({"photo_sha256": [hashlib.sha256(photo(i)).hexdigest() for i in range(3)] + ["x"],
                          "photo_path": paths + [""], "parse_ok": [True, False, True, True],
                          "level_confidence": [0.5, float("nan"), 0.95, 0.2], "trace_id": ["a", "b", "c", "d"],
                          "model_version": ["1"] * 4, "风险": ["r"] * 4, "风险等级": ["中等"] * 4,
                          "纠正和预防建议": ["a"] * 4, "缺陷描述": ["d"] * 4})
    candidates = candidates_from_log(frame, drifted=[False, False, True])
    assert len(candidates) == 3 and candidates[1].level_confidence is None and candidates[2].drifted
    assert candidates[0].phash == photo_phash(photo(0)) and candidates[0].draft["风险等级"] == "中等"
    queue = build_review_queue(candidates, [], QueueConfig(size=3, random_share=0.0))
    write_queue(queue, tmp_path / "queue.json")
    assert read_queue(tmp_path / "queue.json")["counts"] == queue.counts()
    reviewed = known_from_queues([tmp_path / "queue.json"])
    assert {k.sha256 for k in reviewed} == {c.photo_sha256 for c in candidates} and reviewed[0].where == "reviewed"
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"rows": [{"image_sha256": "a" * 64, "phash": candidates[0].phash, "split": "test"},
                                          {"image_sha256": "b" * 64, "split": None}]}), encoding="utf-8")
    assert known_from_split(tmp_path) == [KnownPhoto("a" * 64, candidates[0].phash, "test")]
