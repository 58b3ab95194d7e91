"""The tiny model folder loads like Qwen2.5-VL-7B-Instruct and is reproducible."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from model_fixtures import make_prepared_dataset, make_tiny_model
from riskva_core.errors import RiskvaError
from riskva_core.model.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, TinyModelConfig, main

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REFERENCE = Path("/work/shared/qwen2_5_vl/REFERENCE.md")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    data = make_prepared_dataset(root / "data", 10)
    model = make_tiny_model(root / "model", data)
    return data, model


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_loads_through_auto_classes_with_qwen_ids_from_tokenizer(built):
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLForConditionalGeneration

    data, model_dir = built
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(processor.tokenizer).__name__ == "Qwen2Tokenizer"
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert all(tok.convert_ids_to_tokens(i) == t for i, t in zip(ids, SPECIAL_TOKENS))
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # released order, after the BPE vocabulary
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.text_config.vocab_size >= len(tok)
    assert processor.image_processor.patch_size == 14 and processor.image_processor.merge_size == 2


def test_chat_template_is_the_released_one(built):
    from transformers import AutoProcessor

    _, model_dir = built
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    assert processor.chat_template == CHAT_TEMPLATE
    ref = REFERENCE.read_text(encoding="utf-8")
    block = ref.split("## Chat template", 1)[1].split("```", 2)[1].strip("\n")
    assert block == CHAT_TEMPLATE
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "看图"}]}],
        tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>看图<|im_end|>\n<|im_start|>assistant\n")


def test_forward_and_generate_on_an_image(built):
    import torch
    from riskva_core.model.loading import load_model, load_processor
    from riskva_core.data.samples import read_samples

    data, model_dir = built
    processor = load_processor(model_dir)
    model = load_model(model_dir).eval()
    s = read_samples(data, "train")[0]
    text = processor.apply_chat_template(s.prompt_messages(), tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=[s.load_image()], return_tensors="pt")
    n_img = int((enc["input_ids"] == model.config.image_token_id).sum())
    assert n_img == int(enc["image_grid_thw"].prod()) // 4
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_tokenizer_roundtrips_dataset_text(built):
    from riskva_core.model.loading import load_processor
    from riskva_core.data.samples import read_samples

    data, model_dir = built
    tok = load_processor(model_dir).tokenizer
    answer = read_samples(data, "val")[0].answer
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == answer
    assert len(ids) < len(answer.encode("utf-8")) / 2  # BPE trained on the data compresses it


def test_same_seed_same_bytes_and_cli(built, tmp_path):
    data, model_dir = built
    assert main(["--output_dir", str(tmp_path / "again"), "--dataset_path", str(data)]) == 0
    assert _digest(tmp_path / "again") == _digest(model_dir)
    info = json.loads((model_dir / "tiny_model_info.json").read_text())
    assert info["size"] == "tiny" and info["seed"] == 0


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(RiskvaError, match="--size"):
        TinyModelConfig(output_dir=tmp_path / "m", dataset_path=tmp_path, size="huge")
    with pytest.raises(RiskvaError, match="no such dataset|expected a prepared folder"):
        make_tiny_model(tmp_path / "m", tmp_path / "missing")
