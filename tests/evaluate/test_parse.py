from __future__ import annotations

import json

import pytest

from riskva_core.data.conversation import PromptTemplate
from riskva_core.evaluate.parse import parse_answer

TRUTH = {
    "风险": "厨房用水易溅入墙体造成墙体发霉",
    "风险等级": "轻微",
    "纠正和预防建议": "建议透底处补刷防水涂料",
    "缺陷描述": "厨房墙面防水涂料透底",
}


def test_seed_format_roundtrips_through_the_answer_template():
    text = PromptTemplate().answer(TRUTH)
    r = parse_answer(text)
    assert r.parsed == TRUTH
    assert r.parse_ok
    assert r.source == "markdown"


@pytest.mark.parametrize(
    "text",
    [
        # full-width colons and extra whitespace
        "**风险描述**：  厨房用水易溅入墙体造成墙体发霉 \n**风险等级** ： 轻微\n**纠正和预防建议**：建议透底处补刷防水涂料\n**缺陷描述**：厨房墙面防水涂料透底",
        # no bold markers
        "风险描述: 厨房用水易溅入墙体造成墙体发霉\n风险等级: 轻微\n纠正和预防建议: 建议透底处补刷防水涂料\n缺陷描述: 厨房墙面防水涂料透底",
        # reordered, with an extra field and a preamble
        "报告如下：\n**缺陷描述**: 厨房墙面防水涂料透底\n**位置信息**: 厨房\n**风险等级**: 轻微\n"
        "**风险描述**: 厨房用水易溅入墙体造成墙体发霉\n**纠正和预防建议**: 建议透底处补刷防水涂料",
        # "风险" spelled as in the CSV column, bold colon inside the markers, list bullets
        "- **风险:** 厨房用水易溅入墙体造成墙体发霉\n- **风险等级:** 轻微\n- **纠正和预防建议:** 建议透底处补刷防水涂料\n- **缺陷描述:** 厨房墙面防水涂料透底",
        # all on one line
        "**风险描述**: 厨房用水易溅入墙体造成墙体发霉 **风险等级**: 轻微 **纠正和预防建议**: 建议透底处补刷防水涂料 **缺陷描述**: 厨房墙面防水涂料透底",
        # bold value
        "风险描述：厨房用水易溅入墙体造成墙体发霉\n风险等级：**轻微**\n纠正和预防建议：建议透底处补刷防水涂料\n缺陷描述：厨房墙面防水涂料透底",
    ],
    ids=["fullwidth", "no-bold", "reordered-extra", "bullets", "one-line", "bold-value"],
)
def test_tolerated_shapes(text):
    r = parse_answer(text)
    assert r.parsed == TRUTH
    assert r.parse_ok


def test_multiline_value_runs_until_next_key_and_keeps_inner_colons():
    text = (
        "**风险描述**: 墙体发霉\n**风险等级**: 中等\n**纠正和预防建议**: 1. 铲除霉斑\n2. 补刷防水涂料\n注意：先干燥基层\n"
        "**缺陷描述**: 防水涂料透底"
    )
    r = parse_answer(text)
    assert r.parsed["纠正和预防建议"] == "1. 铲除霉斑\n2. 补刷防水涂料\n注意：先干燥基层"
    assert r.parsed["缺陷描述"] == "防水涂料透底"
    assert r.parse_ok


def test_unbolded_extra_field_ends_the_previous_value():
    text = "风险描述: A\n风险等级: 严重\n纠正和预防建议: C\n缺陷描述: D\n位置信息: 三层楼梯间"
    assert parse_answer(text).parsed["缺陷描述"] == "D"


def test_json_answer_bare_and_fenced():
    obj = {"风险描述": TRUTH["风险"], "风险等级": "轻微", "纠正和预防建议": TRUTH["纠正和预防建议"],
           "缺陷描述": TRUTH["缺陷描述"], "位置信息": "厨房"}
    bare = json.dumps(obj, ensure_ascii=False)
    fenced = f"好的，结果如下：\n```json\n{json.dumps(obj, ensure_ascii=False, indent=2)}\n```\n以上。"
    for text in (bare, fenced, bare + "\n希望有帮助"):
        r = parse_answer(text)
        assert r.source == "json"
        assert r.parsed == TRUTH
        assert r.parse_ok


def test_json_null_and_empty_values_are_missing():
    r = parse_answer('{"风险": "A", "风险等级": "严重", "纠正和预防建议": null, "缺陷描述": ""}')
    assert r.parsed == {"风险": "A", "风险等级": "严重", "纠正和预防建议": None, "缺陷描述": None}
    assert not r.parse_ok


def test_missing_field_is_none_not_guessed():
    r = parse_answer("**风险描述**: A\n**风险等级**: 严重\n**缺陷描述**: D")
    assert r.parsed["纠正和预防建议"] is None
    assert r.parsed["风险"] == "A"
    assert not r.parse_ok


def test_empty_value_is_missing():
    r = parse_answer("**风险描述**: \n**风险等级**: 严重\n**纠正和预防建议**: C\n**缺陷描述**: D")
    assert r.parsed["风险"] is None
    assert not r.parse_ok


@pytest.mark.parametrize("level", ["高", "较严重", "critical", "轻微/中等/严重", "严重风险很高", "不严重。", "严重/中等",
                                   "。", "？", "严重或中等"])
def test_level_outside_the_three_is_invalid(level):
    r = parse_answer(f"**风险描述**: A\n**风险等级**: {level}\n**纠正和预防建议**: C\n**缺陷描述**: D")
    assert r.parsed["风险等级"] == "INVALID"
    assert not r.parse_ok


@pytest.mark.parametrize("level,canonical", [("嚴重", "严重"), ("輕微", "轻微"), ("中 等", "中等"), ("\u3000严重\u3000", "严重")])
def test_level_variants_normalised_like_validation(level, canonical):
    r = parse_answer(f"风险描述: A\n风险等级: {level}\n纠正和预防建议: C\n缺陷描述: D")
    assert r.parsed["风险等级"] == canonical
    assert r.parse_ok


@pytest.mark.parametrize("text", ["", "   ", "一\nr评估血��格�构耐久", "风险很大，需要整改"])
def test_garbage_parses_to_nothing(text):
    r = parse_answer(text)
    assert r.parsed == {"风险": None, "风险等级": None, "纠正和预防建议": None, "缺陷描述": None}
    assert not r.parse_ok
    assert r.source == "none"


def test_first_occurrence_of_a_repeated_key_wins():
    r = parse_answer("风险等级: 轻微\n风险等级: 严重\n风险描述: A\n纠正和预防建议: C\n缺陷描述: D")
    assert r.parsed["风险等级"] == "轻微"


def test_none_input_is_tolerated():
    assert not parse_answer(None).parse_ok


# Shapes a fine-tuned 7B writes for the level line: sentence-final 。, trailing spaces, a doubled
# colon, bold level plus punctuation, quotes/brackets, a full-width space, a semicolon list style.
@pytest.mark.parametrize("line, canonical", [
    ("**风险等级**: 严重。", "严重"),
    ("**风险等级**: 严重 ", "严重"),
    ("**风险等级**：：严重", "严重"),
    ("风险等级: ：严重", "严重"),
    ("**风险等级**：**中等**。", "中等"),
    ("- **风险等级**: 轻微；", "轻微"),
    ("风险等级：「严重」", "严重"),
    ("风险等级：【中等】", "中等"),
    ("风险等级：\u3000轻微\u3000", "轻微"),
    ("**风险等级**: 严重！", "严重"),
    ("**风险等级**: `中等`", "中等"),
    ("风险等级: 嚴重。", "严重"),
    ("**风险等级**: 严重.", "严重"),
])
def test_level_followed_or_preceded_by_punctuation_scores_as_that_level(line, canonical):
    text = f"**风险描述**: 墙体发霉。\n{line}\n**纠正和预防建议**: 铲除霉斑，补刷防水涂料。\n**缺陷描述**: 防水涂料透底。"
    r = parse_answer(text)
    assert r.parsed["风险等级"] == canonical
    assert r.parse_ok


def test_level_with_punctuation_in_json_answers_too():
    r = parse_answer('{"风险": "A", "风险等级": "中等。", "纠正和预防建议": "C", "缺陷描述": "D"}')
    assert r.parsed["风险等级"] == "中等" and r.parse_ok


def test_evaluate_scores_answers_ending_their_level_in_a_full_stop_as_that_level(tmp_path):
    """The issue's measurement: 12 answers, the other three fields right, level ending in 。 → accuracy 1.0."""
    from riskva_core.evaluate.report import evaluate

    levels = ["轻微", "中等", "严重"] * 4
    records = [{"id": f"s{i}", "raw_output": f"**风险描述**: A{i}\n**风险等级**: {lvl}。\n**纠正和预防建议**: C{i}\n"
                                               f"**缺陷描述**: D{i}",
                "ground_truth": {"风险": f"A{i}", "风险等级": lvl, "纠正和预防建议": f"C{i}", "缺陷描述": f"D{i}"}}
               for i, lvl in enumerate(levels)]
    report = evaluate(records, tmp_path / "R", n_resamples=100)
    assert report["risk_level"]["accuracy"] == 1.0 and report["parse_rate"] == 1.0
