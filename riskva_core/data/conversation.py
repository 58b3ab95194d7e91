"""The conversation a sample becomes: system prompt, user turn (image + instruction), answer.

The templates are data, not code, so a team can change the prompt or add answer
fields (the seed's FAQ asks for this) with ``--prompt_config FILE.json`` and no
code change. The same template object is used by prepare, training and inference,
so a model is always asked exactly what it was trained on; the template actually
used is saved next to the prepared data and the trained model.

Stored samples use the plain-string message form that ms-swift and LLaMA-Factory read as they
are (every ``content`` a string; the image as an ``<image>`` tag at the start of the user
text); RisKVA's reader turns it back into Qwen2.5-VL content lists (``from_plain``), which the
chat template renders to the same tokens.
"""
from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path
from typing import Any, Mapping

from riskva_core.errors import RiskvaError
from riskva_core.schema import FIELDS

IMAGE_TAG = "<image>"

DEFAULT_SYSTEM_PROMPT = (
    "你是一名资深的建筑工程质量安全检查专家，熟悉《建筑工程施工质量验收统一标准》等规范。"
    "请根据现场照片识别质量缺陷，评估风险，并给出专业的纠正和预防建议。"
)
DEFAULT_INSTRUCTION = (
    "请仔细观察这张建筑现场照片，识别其中的质量缺陷，并严格按照以下格式输出风险评估报告：\n"
    "**风险描述**: …\n**风险等级**: 轻微/中等/严重\n**纠正和预防建议**: …\n**缺陷描述**: …"
)
# The seed's answer: 风险描述 carries data_风险.
DEFAULT_ANSWER_TEMPLATE = (
    "**风险描述**: {风险}\n"
    "**风险等级**: {风险等级}\n"
    "**纠正和预防建议**: {纠正和预防建议}\n"
    "**缺陷描述**: {缺陷描述}"
)


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    instruction: str = DEFAULT_INSTRUCTION
    answer_template: str = DEFAULT_ANSWER_TEMPLATE

    def __post_init__(self) -> None:
        names = {f for _, f, _, _ in string.Formatter().parse(self.answer_template) if f}
        missing = set(FIELDS) - names
        if missing:
            raise RiskvaError(
                f"answer_template must reference every report field; missing {sorted(missing)}"
            )
        for name in ("system_prompt", "instruction", "answer_template"):
            if IMAGE_TAG in getattr(self, name):
                # The stored plain-string form marks the image with this tag; a literal one in
                # the prompt would be read back as a second image.
                raise RiskvaError(f"prompt template {name} may not contain {IMAGE_TAG!r}")

    @classmethod
    def load(cls, path: str | Path | None) -> "PromptTemplate":
        if path is None:
            return cls()
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RiskvaError(f"--prompt_config {path}: cannot read JSON ({exc})") from None
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise RiskvaError(f"--prompt_config {path}: unknown keys {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def answer(self, fields: Mapping[str, Any]) -> str:
        """The assistant answer for one row; extra keys (e.g. 位置信息) may be referenced."""
        return self.answer_template.format_map(dict(fields))

    def messages(self, image_ref: str | None, fields: Mapping[str, Any] | None = None) -> list[dict]:
        """Chat messages in the Qwen2.5-VL content-list format.

        The image item is a placeholder; prepare writes ``image_ref=None`` for both formats
        (the image lives in the sample's ``image`` column, path or bytes) so JSONL and Parquet
        give identical messages, and the collator attaches the pixels. ``image_ref`` is kept
        for callers that want a self-describing message list (e.g. qwen-vl-utils).
        With ``fields`` the assistant answer is appended (training); without, it is a prompt.
        """
        image_item: dict[str, Any] = {"type": "image"}
        if image_ref is not None:
            image_item["image"] = image_ref
        msgs: list[dict] = [
            {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
            {"role": "user", "content": [image_item, {"type": "text", "text": self.instruction}]},
        ]
        if fields is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": self.answer(fields)}]})
        return msgs


def to_plain(messages: list[dict]) -> list[dict[str, str]]:
    """Content lists → plain strings, each image item as an ``<image>`` tag in its place."""
    plain = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = "".join(IMAGE_TAG if item.get("type") == "image" else item.get("text", "") for item in content)
        plain.append({"role": message["role"], "content": content})
    return plain


def from_plain(messages: list[dict]) -> list[dict]:
    """The inverse of ``to_plain``: plain strings → Qwen2.5-VL content lists; lists pass through."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            items: list[dict[str, Any]] = []
            for i, text in enumerate(content.split(IMAGE_TAG)):
                if i:
                    items.append({"type": "image"})
                if text:
                    items.append({"type": "text", "text": text})
            content = items
        out.append({"role": message["role"], "content": content})
    return out
