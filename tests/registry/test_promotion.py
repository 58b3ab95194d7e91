"""Promotion rule (pure) and its registry moves on real registered tiny pyfunc models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from model_fixtures import make_prepared_dataset, make_tiny_model

from riskva_core.registry import promotion
from riskva_core.errors import RiskvaError
from riskva_core.paths import DataRoot
from riskva_core.registry.client import Registry
from riskva_core.data.samples import read_samples

LEVELS = ["轻微", "中等", "严重"]


def _records(n: int, correct: int, severe_correct: bool = True) -> list[dict]:
    """n predictions (gold levels cycling), the first ``correct`` right; others one level off."""
    out = []
    for i in range(n):
        gold = LEVELS[i % 3]
        right = i < correct or (severe_correct and gold == "严重")
        guess = gold if right else LEVELS[(LEVELS.index(gold) + 1) % 3]
        out.append({"id": f"s{i}", "ground_truth": {"风险等级": gold}, "parsed": {"风险等级": guess}})
    return out


def _report(parse_rate: float, accuracy: float, severe_recall: float = 1.0, majority: float = 0.34) -> dict:
    return {"n": 60, "parse_rate": parse_rate,
            "risk_level": {"accuracy": accuracy, "severe_recall": severe_recall, "under_grading_rate": 0.1},
            "baselines": {"majority": {"level": "中等", "accuracy": majority}}}


def _stats(lo: float, hi: float, n: int = 60) -> dict:
    return {"n": n, "delta": (lo + hi) / 2, "ci95": [lo, hi], "p_value": 0.5}


def test_no_champion_absolute_thresholds_decide():
    ok = promotion.decide(_report(0.97, 0.8), None)
    assert ok.promote and "no champion" in ok.reason
    assert ok.thresholds["margin"] == 0.02 and ok.thresholds["min_parse_rate"] == 0.9
    bad = promotion.decide(_report(0.85, 0.8), None)
    assert not bad.promote and "parse_rate=0.850 < 0.9" in bad.reason
    # A useless model (always the majority level) fails the default thresholds.
    useless = promotion.decide(_report(1.0, 0.34, majority=0.34), None)
    assert not useless.promote and "majority-class baseline 0.340" in useless.reason
    t = promotion.Thresholds(min_level_accuracy=0.85, min_severe_recall=0.9)
    worse = promotion.decide(_report(0.99, 0.8, 0.5), None, t)
    assert not worse.promote and len(worse.failures) == 2


def test_interval_is_read_three_ways_and_each_metric_says_what_it_shows():
    """[−0.10, +0.02] on a large split: cannot tell → inconclusive, not rejected; below 0 → rejected."""
    wide = {"level_accuracy": _stats(-0.10, 0.02, n=400), "severe_recall": _stats(-0.01, 0.05, n=130),
            "parse_rate": _stats(0.0, 0.0, n=400)}
    d = promotion.decide(_report(1.0, 0.9), wide, champion_version="3")
    assert not d.promote and d.outcome == "inconclusive"
    assert d.reason.startswith("inconclusive, champion v3 stays: this test split cannot show non-inferiority; "
                               "level_accuracy Δ=-0.040, 95% CI [-0.100, +0.020] on n=400 photos in 400 groups "
                               "straddles −0.02")
    assert "80% power" in d.reason and "groups of 400 test photos" in d.reason
    acc = d.comparisons["level_accuracy"]
    assert acc["outcome"] == "cannot_tell" and acc["min_margin"] == 0.1
    assert acc["n_needed"] is None and "only a margin above 0.100 would" in d.reason  # Δ itself is below −margin
    assert d.comparisons["severe_recall"]["outcome"] == "non_inferior"
    # Every guarded metric's lower end above −margin → promoted.
    tight = {**wide, "level_accuracy": _stats(-0.015, 0.03, n=400)}
    ok = promotion.decide(_report(1.0, 0.9), tight, champion_version="3")
    assert ok.promote and ok.outcome == "promoted" and "non-inferior to champion v3" in ok.reason
    # The margin is configurable; exactly at −margin is not above it.
    assert promotion.decide(_report(1.0, 0.9), tight, promotion.Thresholds(margin=0.015), "3").outcome == "inconclusive"
    assert promotion.decide(_report(1.0, 0.9), wide, promotion.Thresholds(margin=0.11), "3").promote
    # Measured worse (the whole interval below 0) is rejected, however small the split.
    worse = {**tight, "severe_recall": _stats(-0.4, -0.1, n=30)}
    w = promotion.decide(_report(1.0, 0.9), worse, champion_version="3")
    assert w.outcome == "rejected" and "measured worse than champion v3 on severe_recall" in w.reason
    # No severe photo in the split: the challenger cannot show severe recall, so it is not promoted
    # (issue 25: the burden of proof is the challenger's; this used to pass with a note).
    # With nothing paired at all there is no evidence either way.
    none = {"n": 0, "delta": None, "ci95": None, "p_value": None}
    missing = promotion.decide(_report(1.0, 0.9), {**tight, "severe_recall": none}, champion_version="3")
    assert missing.outcome == "inconclusive" and "no 严重 photo in the test split" in missing.reason
    empty = promotion.decide(_report(1.0, 0.9), {m: none for m in wide}, champion_version="3")
    assert empty.outcome == "inconclusive" and "no test sample was answered by both models" in empty.reason
    with pytest.raises(RiskvaError, match="margin"):
        promotion.Thresholds(margin=-0.1)


def _disagreeing(n: int, wrong: set[int]) -> list[dict]:
    """n predictions (gold levels cycling); the ones in ``wrong`` one level off."""
    out = []
    for i in range(n):
        gold = LEVELS[i % 3]
        guess = LEVELS[(LEVELS.index(gold) + 1) % 3] if i in wrong else gold
        out.append({"id": f"s{i}", "ground_truth": {"风险等级": gold}, "parsed": {"风险等级": guess}, "parse_ok": True})
    return out


def test_planted_evidence_equal_challenger_at_demo_size_is_inconclusive_with_the_photos_needed():
    n = 162  # the demo's test size
    import random

    rng = random.Random(0)
    champ_wrong = set(rng.sample(range(n), 24))
    others = [i for i in range(n) if i not in champ_wrong]
    # Equally good (24 wrong each), but wrong on different photos: a normal disagreement rate.
    chal_wrong = set(rng.sample(sorted(champ_wrong), 8)) | set(rng.sample(others, 16))
    t = promotion.Thresholds(n_resamples=1000)
    cmp = promotion.compare(_disagreeing(n, chal_wrong), _disagreeing(n, champ_wrong), t)
    d = promotion.decide(_report(1.0, 1 - 24 / n), cmp, t, champion_version="1")
    assert d.outcome == "inconclusive" and not d.promote
    acc = d.comparisons["level_accuracy"]
    assert acc["delta"] == 0.0 and acc["outcome"] == "cannot_tell"
    assert 0.05 < acc["min_margin"] < 0.09  # the smallest margin n=162 could show
    # ((1.96 + 0.84)·sd/0.02)² at 80% power, sd² ≈ (32 + 2 pseudo pairs)/163, no groups recorded
    assert 3500 < acc["photos_needed"] < 4500
    assert (f"≈{acc['photos_needed']} labelled test photos (now 162; ≈{acc['photos_needed'] - 162} more) would "
            "show margin 0.02 with 80% power") in d.reason
    # Severe recall on 54 photos must be shown too (it no longer waves itself through below 100 pairs):
    # the reason names the 严重 photos that would show it.
    sev = d.comparisons["severe_recall"]
    assert sev["n"] == 54 and sev["outcome"] == "cannot_tell"
    assert f"≈{sev['n_needed']} 严重 test photos (now 54;" in d.reason and sev["n_needed"] > 54
    assert sev["photos_needed"] == -(-sev["n_needed"] * 162 // 54)  # scaled by 严重's share of the split


def test_planted_evidence_clearly_worse_is_rejected_and_clearly_better_on_a_large_split_is_promoted():
    n = 162
    champion = _disagreeing(n, set(range(0, n, 10)))  # 17 wrong
    worse = _disagreeing(n, set(range(0, n, 3)))  # 54 wrong
    d = promotion.decide(_report(1.0, 0.66), promotion.compare(worse, champion), champion_version="1")
    assert d.outcome == "rejected" and "measured worse than champion v1 on level_accuracy" in d.reason
    big = 2400
    better = promotion.compare(_disagreeing(big, set(range(0, big, 20))), _disagreeing(big, set(range(0, big, 8))))
    ok = promotion.decide(_report(1.0, 0.95), better, champion_version="1")
    assert ok.outcome == "promoted" and ok.comparisons["level_accuracy"]["outcome"] == "non_inferior"
    assert ok.comparisons["severe_recall"]["n"] == 800 and not ok.notes


def test_paired_comparison_on_predictions():
    champion = _records(90, correct=90)
    worse = _records(90, correct=20, severe_correct=False)
    cmp = promotion.compare(worse, champion)
    assert cmp["level_accuracy"]["n"] == 90 and cmp["severe_recall"]["n"] == 30 and cmp["parse_rate"]["n"] == 90
    assert cmp["level_accuracy"]["ci95"][1] < 0
    d = promotion.decide(_report(1.0, 0.5), cmp, champion_version="3")
    assert not d.promote and "measured worse than champion v3 on level_accuracy" in d.reason
    assert "severe_recall" in d.reason
    # Slightly worse on a small split (88 vs 90 right): the interval reaches below −0.02 but not below 0.
    close = promotion.compare(_records(90, correct=88), champion)
    assert close["level_accuracy"]["ci95"][0] < -0.02
    assert promotion.decide(_report(1.0, 0.98), close, champion_version="3").outcome in {"inconclusive", "rejected"}
    # At least as good everywhere, but 30 severe photos cannot show severe recall within 0.02:
    # inconclusive, naming the 严重 photos needed (this was promoted before issue 25).
    better = promotion.compare(_records(90, correct=90), _records(90, correct=85))
    small = promotion.decide(_report(1.0, 1.0), better, champion_version="3")
    assert small.outcome == "inconclusive" and "severe_recall" in small.reason and "严重 test photos (now 30;" in small.reason
    # The same models on 900 photos (300 severe): shown non-inferior everywhere → promoted.
    better = promotion.compare(_records(900, correct=900), _records(900, correct=850))
    assert promotion.decide(_report(1.0, 1.0), better, champion_version="3").promote
    # An unparsed answer counts against parse_rate.
    broken = [dict(r, parse_ok=False) for r in _records(90, 90)]
    assert promotion.compare(broken, champion)["parse_rate"]["delta"] == -1.0


def test_scores_treat_errors_as_misses_and_need_ground_truth():
    recs = [{"id": "a", "ground_truth": {"风险等级": "严重"}, "parsed": {"风险等级": "严重"}, "error": "bad image"}]
    assert promotion.per_sample_scores(recs) == {"level_accuracy": {"a": 0.0}, "severe_recall": {"a": 0.0},
                                                "parse_rate": {"a": 0.0}}
    with pytest.raises(RiskvaError, match="ground-truth"):
        promotion.per_sample_scores([{"id": "b", "parsed": {}}])
    with pytest.raises(RiskvaError, match="min_parse_rate"):
        promotion.Thresholds(min_parse_rate=1.5)


@pytest.fixture(scope="module")
def registry_with_versions(tmp_path_factory) -> Registry:
    tmp = tmp_path_factory.mktemp("promo")
    ds = make_prepared_dataset(tmp / "ds", n=8)
    model = make_tiny_model(tmp / "tiny", ds)
    reg = Registry.under(DataRoot(tmp / "home"))
    image = read_samples(ds, "test")[0].image_file.read_bytes()
    for i in range(3):
        reg.log_model(model, example_image=image, tags={"dataset_version": f"v{i + 1}"},
                      model_config={"max_new_tokens": 4, "batch_size": 1})
    return reg


def test_registry_round_trip_promote_reject_rollback(registry_with_versions: Registry):
    reg = registry_with_versions
    # v1: first model, meets thresholds → champion.
    reg.set_alias("challenger", "1")
    d1 = promotion.decide(_report(0.99, 0.8), None)
    assert promotion.apply_decision(reg, "1", d1) == {"challenger": "1", "champion": "1"}
    # v2: better → champion; v1 becomes previous_champion.
    reg.set_alias("challenger", "2")
    cmp = promotion.compare(_records(900, 880), _records(900, 800))  # 300 severe photos: enough to show it
    d2 = promotion.decide(_report(0.99, 0.97), cmp, champion_version="1")
    aliases = promotion.apply_decision(reg, "2", d2, {"dagster_run_id": "run-2"})
    assert aliases == {"challenger": "2", "champion": "2", "previous_champion": "1"}
    tags2 = reg.get_version("2").tags
    assert tags2["promotion.decision"] == "promoted" and tags2["promotion.compared_to"] == "1"
    assert tags2["promotion.dagster_run_id"] == "run-2" and json.loads(tags2["promotion.comparison"])
    assert reg.get_version("1").tags["promotion.decision"] == "replaced"
    # v3: significantly worse → stays challenger, reason recorded.
    reg.set_alias("challenger", "3")
    cmp3 = promotion.compare(_records(90, 10, severe_correct=False), _records(90, 88))
    # v3's merge gate could not tell its merge from the base (tag set at registration): the decision says so.
    assert promotion.merge_verdict_of(reg, "2") is None
    reg.set_tags("3", {"merge.verdict": "unverifiable"})
    d3 = promotion.decide(_report(0.99, 0.1), cmp3, champion_version="2",
                          merge_verdict=promotion.merge_verdict_of(reg, "3"))
    assert "the merge could not be verified" in d3.reason
    assert promotion.apply_decision(reg, "3", d3) == {"challenger": "3", "champion": "2", "previous_champion": "1"}
    tags3 = reg.get_version("3").tags
    assert tags3["promotion.decision"] == "rejected" and "measured worse than champion v2" in tags3["promotion.reason"]
    assert json.loads(tags3["promotion.thresholds"])["margin"] == 0.02
    # Rollback to the previous champion; then manual promotion of v3 with a reason.
    assert promotion.rollback(reg, "v2 misgrades site photos") == {
        "challenger": "3", "champion": "1", "previous_champion": "2"}
    assert reg.get_version("2").tags["promotion.decision"] == "rolled_back"
    history = json.loads(reg.get_version("1").tags["promotion.history"])
    assert [h["action"] for h in history] == ["promoted", "replaced", "restored"]
    assert promotion.promote(reg, "3", "approved by QA")["champion"] == "3"
    assert reg.get_version("3").tags["promotion.reason"] == "approved by QA"
    with pytest.raises(RiskvaError, match="already the champion"):
        promotion.rollback(reg, "again", version="3")
    with pytest.raises(RiskvaError, match="no version"):
        promotion.promote(reg, "99", "typo")


def test_planted_stale_evidence_is_refused(tmp_path):
    from riskva_core.registry import evidence

    (tmp_path / "dataset_info.json").write_text(json.dumps({"splits": {"test": {"sha256": "c" * 64}}}), encoding="utf-8")
    current = evidence.test_split_sha256(tmp_path)
    preds = evidence.stamp(_records(30, 30), "7", current)
    report = {"provenance": {"model_version": "7", "test_split_sha256": current}}
    evidence.require(preds, report, "7", current)  # the evidence for v7 on today's split: accepted
    with pytest.raises(RiskvaError, match=r"stale evidence: predictions are for model version\(s\) 6, not v7"):
        evidence.require(evidence.stamp(preds, "6", current), report, "7", current)
    old_split = evidence.stamp(preds, "7", "a" * 64)
    with pytest.raises(RiskvaError, match="scored on test split\\(s\\) aaaaaaaaaaaa, not the current test split cccc"):
        evidence.require(old_split, report, "7", current)
    assert evidence.problems(preds, {"provenance": {"model_version": "6", "test_split_sha256": current}}, "7",
                             current) == ["report is for model version 6, not v7"]
    unstamped = _records(30, 30)  # written before evaluation recorded what it scored
    assert len(evidence.problems(unstamped, {}, "7", current)) == 4
    with pytest.raises(RiskvaError, match="no test split hash"):
        evidence.test_split_sha256(tmp_path / "missing")
