"""The verdicts behind the asset checks: merge equivalence from merge_report.json, and the
absolute thresholds the evaluation check records."""
from __future__ import annotations

from riskva_assets.model_assets import merge_verdict
from riskva_core.registry import promotion


def test_merge_verdict_reads_the_report():
    ok = {"max_abs_logit_diff": 2e-7, "reload_max_abs_logit_diff": None, "tolerance": 1e-4}
    assert merge_verdict(ok) == (True, "max_abs_logit_diff=2e-07 (tolerance 0.0001)")
    bad_reload = {**ok, "reload_max_abs_logit_diff": 3e-3}
    passed, detail = merge_verdict(bad_reload)
    assert not passed and "reload_max_abs_logit_diff=0.003" in detail
    assert merge_verdict({"equivalent": False, "reason": "logits differ"}) == (False, "logits differ")
    assert merge_verdict({"tolerance": 1e-4}) == (False, "merge report has no logit difference or tolerance")


def test_threshold_check_failures_name_each_threshold():
    report = {"parse_rate": 0.5, "risk_level": {"accuracy": 0.3, "severe_recall": 0.2, "under_grading_rate": 0.4},
              "baselines": {"majority": {"accuracy": 0.4}}}
    failures = promotion.absolute_failures(report, promotion.Thresholds())
    assert failures == ["parse_rate=0.500 < 0.9",
                        "level_accuracy=0.300 not above the majority-class baseline 0.400"]
