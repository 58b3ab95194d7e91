from riskva_core.schema import CSV_COLUMNS, LEVELS, normalize_level, normalize_text


def test_levels_are_ordered_mild_to_severe():
    assert LEVELS == ("轻微", "中等", "严重")


def test_csv_columns_are_the_seeds_in_order():
    assert CSV_COLUMNS == (
        "image_id", "image_path", "data_风险", "data_纠正和预防建议", "data_风险等级", "data_缺陷描述",
    )


def test_normalize_level_accepts_only_unambiguous_variants():
    assert normalize_level("严重") == "严重"
    assert normalize_level("  中等\u3000") == "中等"  # ideographic space
    assert normalize_level("嚴重") == "严重"  # traditional script
    assert normalize_level("輕微") == "轻微"
    assert normalize_level("严 重") == "严重"
    for ambiguous in ("较严重", "高", "", "severe", None, "中"):
        assert normalize_level(ambiguous) is None


def test_normalize_text_folds_full_width_and_strips():
    assert normalize_text("　ＡＢＣ１２３：ok ") == "ABC123:ok"
