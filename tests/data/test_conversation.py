import json

import pytest

from riskva_core.data.conversation import PromptTemplate, from_plain, to_plain
from riskva_core.errors import RiskvaError

FIELDS = {"风险": "墙体发霉", "风险等级": "轻微", "纠正和预防建议": "补刷防水涂料", "缺陷描述": "墙面防水涂料透底"}


def test_default_answer_is_the_seed_format():
    answer = PromptTemplate().answer(FIELDS)
    assert answer.splitlines() == [
        "**风险描述**: 墙体发霉",
        "**风险等级**: 轻微",
        "**纠正和预防建议**: 补刷防水涂料",
        "**缺陷描述**: 墙面防水涂料透底",
    ]


def test_messages_have_image_then_instruction_and_optional_answer():
    t = PromptTemplate()
    prompt = t.messages("images/a.jpg")
    assert [m["role"] for m in prompt] == ["system", "user"]
    assert prompt[1]["content"][0] == {"type": "image", "image": "images/a.jpg"}
    full = t.messages(None, FIELDS)
    assert full[-1]["role"] == "assistant"
    assert full[1]["content"][0] == {"type": "image"}


def test_prompt_config_loads_and_validates(tmp_path):
    cfg = tmp_path / "p.json"
    cfg.write_text(json.dumps({"answer_template": "{风险}|{风险等级}|{纠正和预防建议}|{缺陷描述}|{位置}"}), "utf-8")
    t = PromptTemplate.load(cfg)
    assert t.answer({**FIELDS, "位置": "厨房"}).endswith("|厨房")
    cfg.write_text(json.dumps({"answer_template": "{风险}"}), "utf-8")
    with pytest.raises(RiskvaError, match="missing"):
        PromptTemplate.load(cfg)
    cfg.write_text(json.dumps({"bogus": 1}), "utf-8")
    with pytest.raises(RiskvaError, match="unknown keys"):
        PromptTemplate.load(cfg)


def test_plain_form_round_trips_and_a_literal_image_tag_is_refused():
    t = PromptTemplate()
    full = t.messages(None, {f: f"v{f}" for f in FIELDS})
    plain = to_plain(full)
    assert all(isinstance(m["content"], str) for m in plain)
    assert plain[1]["content"] == "<image>" + t.instruction
    assert from_plain(plain) == full and from_plain(full) == full
    with pytest.raises(RiskvaError, match="<image>"):
        PromptTemplate(instruction="看图 <image>")
