from __future__ import annotations

import jieba
import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from riskva_core.evaluate import metrics as M

A = "厨房墙面防水涂料透底"


# ---------------------------------------------------------------- text metrics

def test_identical_chinese_strings_score_one_and_hundred():
    s = M.text_scores(A, A)
    assert s["rouge_l_char"] == 1.0
    assert s["bleu4_char"] == 100.0
    assert s["rouge1_jieba"] == 100.0
    assert s["rouge2_jieba"] == 100.0
    assert s["rouge_l_jieba"] == 100.0


@pytest.mark.parametrize("pred,ref", [("", A), (A, ""), (None, A), (A, None), ("   ", A), ("", "")])
def test_empty_text_scores_zero(pred, ref):
    assert all(v == 0.0 for v in M.text_scores(pred, ref).values())


def test_rouge_l_char_hand_computed():
    # LCS("墙面发霉", "厨房墙面防水涂料透底") = "墙面" = 2 chars; F1 = 2*2 / (4 + 10) = 2/7.
    assert M.rouge_l_char("墙面发霉", A) == pytest.approx(2 / 7)
    # LCS("墙体开裂严重", "墙面开裂") = 墙,开,裂 = 3; F1 = 2*3 / (6 + 4) = 0.6.
    assert M.rouge_l_char("墙体开裂严重", "墙面开裂") == pytest.approx(0.6)


def test_rouge_l_char_nfkc_and_whitespace():
    # Full-width letters/digits fold to ASCII under NFKC; spaces carry no content.
    assert M.rouge_l_char("Ｃ３０混凝土", "C30混凝土") == 1.0
    assert M.rouge_l_char("墙 面\n开裂", "墙面开裂") == 1.0


def _llamafactory_reference(pred: str, label: str) -> dict[str, float]:
    """LLaMA-Factory scripts/eval_bleu_rouge.py compute_metrics, verbatim in substance."""
    hypothesis = list(jieba.cut(pred))
    reference = list(jieba.cut(label))
    bleu_score = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
        result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
    out = {k: round(v["f"] * 100, 4) for k, v in result.items()}
    out["bleu-4"] = round(bleu_score * 100, 4)
    return out


@pytest.mark.parametrize(
    "pred,ref",
    [
        ("墙面发霉", A),
        ("建议对裂缝进行注浆修补", "建议对裂缝进行注浆修补并加强养护"),
        ("钢筋外露，锈蚀严重。需要除锈。", "钢筋锈蚀降低承载力。建议除锈后用高强砂浆封闭"),
        ("abc 123", "abc 124"),
    ],
)
def test_bleu_and_jieba_rouge_match_llamafactory(pred, ref):
    ours = M.llamafactory_scores(pred, ref)
    ref_scores = _llamafactory_reference(pred, ref)
    assert ours == {
        "bleu4_char": ref_scores["bleu-4"],
        "rouge1_jieba": ref_scores["rouge-1"],
        "rouge2_jieba": ref_scores["rouge-2"],
        "rouge_l_jieba": ref_scores["rouge-l"],
    }
    assert 0 < ours["rouge1_jieba"] < 100


# ---------------------------------------------------------------- level metrics

TRUE = ["轻微", "中等", "严重", "严重"]
PRED = ["轻微", "严重", "INVALID", "中等"]


def test_confusion_matrix_fixed_label_order():
    m = M.level_metrics(TRUE, PRED)
    assert m["labels"] == ["轻微", "中等", "严重", "INVALID"]
    # rows truth, columns prediction: 轻微→轻微, 中等→严重, 严重→INVALID, 严重→中等
    assert m["confusion"] == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0]]


def test_accuracy_f1_recall_hand_computed():
    m = M.level_metrics(TRUE, PRED)
    assert m["accuracy"] == 0.25
    # per-class F1: 轻微 1 (p=1, r=1), 中等 0, 严重 0 → macro (1+0+0)/3
    assert m["macro_f1"] == pytest.approx(1 / 3)
    assert m["per_class"]["轻微"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert m["per_class"]["严重"]["support"] == 2
    assert m["severe_recall"] == 0.0
    assert m["invalid_rate"] == 0.25


def test_qwk_hand_computed_with_invalid_as_farthest_level():
    # INVALID on a 严重 truth is scored as 轻微 → pred ranks [0, 2, 0, 1], truth ranks [0, 1, 2, 2].
    # Weights w = (i-j)^2 / 4. Observed: (0,0) 0 + (1,2) 1/4 + (2,0) 1 + (2,1) 1/4 = 1.5, /4 = 0.375.
    # Marginals truth [1/4, 1/4, 1/2], pred [1/2, 1/4, 1/4]; expected sum w*r_i*c_j = 0.40625.
    # kappa = 1 - 0.375 / 0.40625 = 1/13.
    assert M.qwk(TRUE, PRED) == pytest.approx(1 / 13)
    assert M.qwk(TRUE, TRUE) == pytest.approx(1.0)


def test_invalid_is_never_better_than_a_wrong_level_in_qwk():
    truth = ["轻微", "中等", "严重", "轻微", "中等", "严重"]
    adjacent = ["中等", "中等", "严重", "轻微", "中等", "严重"]
    invalid = ["INVALID", "中等", "严重", "轻微", "中等", "严重"]
    assert M.qwk(truth, invalid) < M.qwk(truth, adjacent)


def test_qwk_undefined_is_none():
    assert M.qwk(["严重", "严重"], ["严重", "严重"]) is None


def test_invalid_counts_against_macro_f1():
    truth = ["轻微", "中等", "严重"]
    assert M.macro_f1(truth, ["轻微", "中等", "严重"]) == 1.0
    # 严重 missed (F1 0), 轻微 and 中等 perfect → 2/3
    assert M.macro_f1(truth, ["轻微", "中等", "INVALID"]) == pytest.approx(2 / 3)


def test_under_grading_rate_counts_lower_levels_and_invalid():
    # 中等→轻微 under, 严重→严重 fine, 轻微→INVALID under, 轻微→严重 over (not under)
    assert M.under_grading_rate(["中等", "严重", "轻微", "轻微"], ["轻微", "严重", "INVALID", "严重"]) == 0.5


def test_unrecognised_prediction_spellings_become_invalid():
    m = M.level_metrics(["严重"], ["高"])
    assert m["confusion"][2][3] == 1
    assert M.level_metrics(["严重"], ["嚴重"])["accuracy"] == 1.0


def test_ground_truth_must_be_a_level():
    with pytest.raises(ValueError, match="ground-truth"):
        M.level_metrics(["高"], ["严重"])


def test_majority_baseline():
    b = M.majority_baseline(["严重", "严重", "轻微", "中等"])
    assert b["level"] == "严重"
    assert b["accuracy"] == 0.5
    assert b["severe_recall"] == 1.0
    assert b["qwk"] == pytest.approx(0.0)  # a constant predictor agrees only by chance
    assert b["under_grading_rate"] == 0.0
    # a tie goes to the milder level, deterministically
    assert M.majority_level(["严重", "轻微"]) == "轻微"


# ---------------------------------------------------------------- per-sample + bootstrap

def test_error_record_counts_as_failure():
    gt = {"风险": "A", "风险等级": "严重", "纠正和预防建议": "C", "缺陷描述": "D"}
    ok = M.prediction_scores({"id": "1", "parsed": gt, "ground_truth": gt})
    failed = M.prediction_scores({"id": "1", "parsed": gt, "ground_truth": gt, "error": "corrupt"})
    assert ok["level_correct"] == 1.0 and ok["mean"]["rouge_l_char"] == 1.0
    assert failed["pred_level"] == "INVALID"
    assert failed["level_correct"] == 0.0 and failed["mean"]["rouge_l_char"] == 0.0


def test_bootstrap_is_deterministic_per_seed():
    values = [0.1, 0.9, 0.4, 0.4, 0.7, 0.2, 1.0, 0.0]

    def stat(idx):
        return float(sum(values[i] for i in idx) / len(idx))

    a = M.bootstrap_ci(len(values), stat, n_resamples=300, seed=7)
    b = M.bootstrap_ci(len(values), stat, n_resamples=300, seed=7)
    c = M.bootstrap_ci(len(values), stat, n_resamples=300, seed=8)
    assert a == b
    assert a != c
    assert a[0] < sum(values) / len(values) < a[1]


def test_paired_bootstrap():
    same = M.paired_bootstrap([1, 0, 1, 0], [1, 0, 1, 0], 200, 0)
    assert same["delta"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["p_value"] == 1.0
    better = M.paired_bootstrap([1] * 10, [0] * 10, 200, 0)
    assert better["delta"] == 1.0 and better["ci95"] == [1.0, 1.0]
    assert better["p_value"] == pytest.approx(2 / 201)  # no resample at or below zero, +1 smoothing
    assert M.paired_bootstrap([1, 0, 1, 1, 0], [0, 0, 1, 0, 1], 500, 3) == M.paired_bootstrap(
        [1, 0, 1, 1, 0], [0, 0, 1, 0, 1], 500, 3)
    with pytest.raises(ValueError):
        M.paired_bootstrap([1, 0], [1], 10, 0)


def test_compare_predictions_matches_by_id():
    gt = {"风险": "A", "风险等级": "严重", "纠正和预防建议": "C", "缺陷描述": "D"}
    wrong = {**gt, "风险等级": "轻微"}
    a = [{"id": str(i), "parsed": gt, "ground_truth": gt} for i in range(6)]
    b = [{"id": str(i), "parsed": wrong, "ground_truth": gt} for i in reversed(range(1, 7))]
    out = M.compare_predictions(a, b, 200, 0)
    assert (out["n_matched"], out["n_only_a"], out["n_only_b"]) == (5, 1, 1)
    assert out["accuracy"]["delta"] == 1.0
    # text fields are identical, only the level differs → no ROUGE-L difference
    assert out["rouge_l_char"]["delta"] == 0.0


def test_macro_f1_codes_equals_sklearn_on_random_labels():
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(20):
        t = rng.integers(0, 3, size=15)
        p = rng.integers(0, 4, size=15)  # code 3 = INVALID
        labels = list(M.CONFUSION_LABELS)
        assert M.macro_f1_codes(t, p) == pytest.approx(M.macro_f1([labels[i] for i in t], [labels[i] for i in p]))


# ---------------------------------------------------------------- cluster bootstrap (issue 25)

def _clustered(n_groups: int, size: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Paired differences where each group of ``size`` near-duplicates shares one outcome."""
    rng = np.random.default_rng(seed)
    per_group = rng.choice([-1.0, 0.0, 1.0], p=[0.15, 0.7, 0.15], size=n_groups)
    return np.repeat(per_group, size), [f"g{g}" for g in np.repeat(np.arange(n_groups), size)]


def test_group_codes_follow_first_appearance_and_ungrouped_photos_stand_alone():
    from riskva_core.evaluate.bootstrap import group_codes

    assert group_codes(["b", "a", "b", None, None, "a"], 6).tolist() == [0, 1, 0, 2, 3, 1]
    assert group_codes(None, 3).tolist() == [0, 1, 2]
    assert group_codes([3, "3"], 2).tolist() == [0, 0]  # split.json's int label and its string are one group
    with pytest.raises(ValueError, match="2 group ids for 3 samples"):
        group_codes(["a", "b"], 3)


def test_singleton_groups_give_exactly_the_photo_bootstrap():
    a, b = [1, 0, 1, 1, 0, 1, 0, 0, 1], [0, 0, 1, 0, 1, 1, 1, 0, 0]
    photo = M.paired_bootstrap(a, b, 500, 3)
    assert M.paired_bootstrap(a, b, 500, 3, groups=[f"g{i}" for i in range(9)]) == photo
    assert M.paired_bootstrap(a, b, 500, 3, groups=[None] * 9) == photo
    # the same draws as resampling photo indices directly (what evaluation did before groups)
    idx = np.random.default_rng(3).integers(0, 9, size=(500, 9))
    deltas = (np.array(a) - np.array(b))[idx].mean(axis=1)
    assert photo["ci95"] == pytest.approx(list(np.percentile(deltas, [2.5, 97.5])))


def test_duplicated_photos_do_not_narrow_the_interval():
    """Each group of 4 near-duplicates answered alike is one piece of evidence, not four."""
    diff, groups = _clustered(60, 4, seed=1)
    grouped = M.paired_bootstrap(diff, np.zeros_like(diff), 2000, 0, groups=groups)
    one_each = M.paired_bootstrap(diff[::4], np.zeros(60), 2000, 0)
    as_photos = M.paired_bootstrap(diff, np.zeros_like(diff), 2000, 0)
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert grouped["n_groups"] == 60 and grouped["n"] == 240
    assert width(grouped) == pytest.approx(width(one_each), rel=0.15)  # as if one photo per defect
    assert width(as_photos) < 0.6 * width(grouped)  # the photo bootstrap's false precision (≈ 1/2)
    assert grouped["design_effect"] == pytest.approx(4.0, rel=0.05)  # 4 identical copies per group
    assert as_photos["design_effect"] == 1.0


def test_bootstrap_ci_resamples_groups():
    diff, groups = _clustered(50, 3, seed=2)

    def mean(idx):
        return float(diff[idx].mean())

    grouped = M.bootstrap_ci(len(diff), mean, 1000, 0, groups=groups)
    photos = M.bootstrap_ci(len(diff), mean, 1000, 0)
    assert grouped[0] < diff.mean() < grouped[1]
    assert (photos[1] - photos[0]) < 0.7 * (grouped[1] - grouped[0])  # ≈ 1/sqrt(3)
    assert M.bootstrap_ci(len(diff), mean, 1000, 0, groups=groups) == grouped  # seeded


def test_compare_predictions_reads_the_records_groups():
    gt = {"风险": "A", "风险等级": "严重", "纠正和预防建议": "C", "缺陷描述": "D"}
    wrong = {**gt, "风险等级": "轻微"}
    a = [{"id": str(i), "parsed": gt if i % 8 < 4 else wrong, "ground_truth": gt, "group": f"g{i // 4}"}
         for i in range(40)]
    b = [{"id": str(i), "parsed": gt, "ground_truth": gt} for i in range(40)]
    out = M.compare_predictions(a, b, 300, 0)
    assert out["accuracy"]["n_groups"] == 10 and out["accuracy"]["n"] == 40


def test_photos_needed_formula():
    from statistics import NormalDist

    from riskva_core.evaluate.bootstrap import photos_needed

    z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)
    assert photos_needed(0.45, 0.02) == int(np.ceil((z * 0.45 / 0.02) ** 2))
    assert photos_needed(0.45, 0.02, design_effect=2.0) == int(np.ceil((z * 0.45 / 0.02) ** 2 * 2))
    assert photos_needed(0.45, 0.02, design_effect=0.5) == photos_needed(0.45, 0.02)  # floored at 1
    assert photos_needed(0.45, 0.02, power=0.9) > photos_needed(0.45, 0.02)
    assert photos_needed(0.45, 0.0) is None and photos_needed(0.45, -0.01) is None
    with pytest.raises(ValueError, match="power"):
        photos_needed(0.45, 0.02, power=1.0)
