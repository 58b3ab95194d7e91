"""Merge: standalone safetensors model, verified equal to base+adapter, loads without peft."""
from __future__ import annotations

import json
import os

import pytest
import torch

from model_fixtures import make_prepared_dataset, make_tiny_model
from riskva_core.errors import RiskvaError
from riskva_core.model.merge import MergeConfig, fixed_inputs, merge
from riskva_core.model.loading import load_model, load_processor, save_processor, set_pixel_budget
from riskva_core.train.trainable import apply_trainable
from riskva_core.train.config import TrainableArguments
from riskva_core.data.conversation import PromptTemplate

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter with lm_head/merger copies, all moved away from their init values."""
    root = tmp_path_factory.mktemp("merge")
    data = make_prepared_dataset(root / "data", 5)
    base = make_tiny_model(root / "model", data)
    cfg = TrainableArguments(lora_r=4, lora_alpha=8, tune_merger=True, train_lm_head=True)
    model = apply_trainable(load_model(base), cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    out = root / "adapter"
    model.save_pretrained(out, safe_serialization=True)
    processor = load_processor(base)
    set_pixel_budget(processor, 28 * 28, 112 * 112)
    save_processor(processor, out)
    (out / "training_args.json").write_text(json.dumps({"seed": 0}))
    return root, base, out, model


def test_merged_model_matches_base_plus_adapter_and_loads_without_peft(adapter):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    root, base, adapter_dir, peft_model = adapter
    out = root / "merged"
    report = merge(MergeConfig(base_model_path=base, adapter_path=adapter_dir, output_dir=out))
    assert report["dtype"] == "float32" and report["max_abs_logit_diff"] < 1e-4
    saved = json.loads((out / "merge_report.json").read_text())
    assert saved["max_abs_logit_diff"] == report["max_abs_logit_diff"]
    # Every LoRA layer is reported; in fp32 the whole update survives.
    assert saved["lora_layers"] == len(saved["layers"]) > 0 and saved["min_kept"] > 0.999
    assert (out / "model.safetensors").is_file() and (out / "training_args.json").is_file()
    assert not list(out.glob("*.bin")) and not (out / "adapter_config.json").exists()

    # Plain transformers, no peft: same logits as base+adapter on an independent input.
    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    assert dict(processor.image_processor.size) == {"shortest_edge": 784, "longest_edge": 112 * 112}
    assert not any("lora" in n for n, _ in model.named_parameters())
    inputs = fixed_inputs(processor, PromptTemplate(instruction="另一个问题"))
    peft_model.eval()
    with torch.no_grad():
        diff = (model(**inputs).logits - peft_model(**inputs).logits).abs().max().item()
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert diff < 1e-4
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 4 or processor.tokenizer.eos_token_id in gen[0].tolist()


def test_merge_fails_loudly_and_writes_nothing_when_verification_fails(adapter):
    root, base, adapter_dir, _ = adapter
    out = root / "strict"
    with pytest.raises(RiskvaError, match="verification failed") as err:
        merge(MergeConfig(base_model_path=base, adapter_path=adapter_dir, output_dir=out, tolerance=1e-30))
    assert err.value.exit_code == 3
    assert not out.exists()


def test_bad_paths_are_one_line_errors(adapter, tmp_path):
    _, base, adapter_dir, _ = adapter
    with pytest.raises(RiskvaError, match="adapter_config.json"):
        MergeConfig(base_model_path=base, adapter_path=tmp_path, output_dir=tmp_path / "o")
    with pytest.raises(RiskvaError, match="--base_model_path .*no such model folder"):
        MergeConfig(base_model_path=tmp_path / "nope", adapter_path=adapter_dir, output_dir=tmp_path / "o")
    with pytest.raises(RiskvaError, match="--base_model_path nobody/no-such-model: not a local folder and not in "
                       "the Hugging Face cache"):
        MergeConfig(base_model_path="nobody/no-such-model", adapter_path=adapter_dir, output_dir=tmp_path / "o")
    with pytest.raises(RiskvaError, match="float16 is refused: Qwen2.5-VL"):
        MergeConfig(base_model_path=base, adapter_path=adapter_dir, output_dir=tmp_path / "o", torch_dtype="float16")


@pytest.fixture(scope="module")
def bf16_base(adapter):
    """The tiny base saved in bf16, as the 7B is shipped."""
    root, base, _, _ = adapter
    out = root / "base_bf16"
    model = load_model(base, dtype="bfloat16")
    model.save_pretrained(out, safe_serialization=True)
    load_processor(base).save_pretrained(out)
    return out


def _planted_adapter(base, out, data_root, b_value: float):
    """A LoRA adapter on ``base`` whose B matrices are all ``b_value`` (A keeps peft's init)."""
    model = apply_trainable(load_model(base, dtype="bfloat16"), TrainableArguments(lora_r=4, lora_alpha=8), seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(b_value)
    model.save_pretrained(out, safe_serialization=True)
    save_processor(load_processor(base), out)
    return out


def test_bf16_merge_is_saved_in_bf16_verified_and_reports_what_survived(adapter, bf16_base):
    from safetensors import safe_open

    root = adapter[0]
    planted = _planted_adapter(bf16_base, root / "strong", root / "data", 0.05)
    out = root / "merged_bf16"
    report = merge(MergeConfig(base_model_path=bf16_base, adapter_path=planted, output_dir=out))
    assert report["dtype"] == "bfloat16" and report["tolerance"] == 3e-2
    assert report["max_abs_logit_diff"] <= report["tolerance_abs"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    layers = json.loads((out / "merge_report.json").read_text())["layers"]
    assert all(0.5 < v["kept"] <= 1 for v in layers.values()) and any("q_proj" in k for k in layers)


def test_merge_refuses_an_update_far_below_bf16_resolution_and_names_the_layers(adapter, bf16_base):
    """B = 1e-6: B·A·scale is ~1e-6 of weights ~0.02, whose bf16 spacing is ~1e-4: it rounds away."""
    root = adapter[0]
    planted = _planted_adapter(bf16_base, root / "weak", root / "data", 1e-6)
    out = root / "merged_weak"
    with pytest.raises(RiskvaError, match=r"rounded away in bfloat16 .*model\.language_model\.layers\.0\."
                       r"self_attn\.q_proj") as err:
        merge(MergeConfig(base_model_path=bf16_base, adapter_path=planted, output_dir=out))
    assert err.value.exit_code == 3 and not out.exists()
    # The same adapter merges in float32, where the update survives.
    report = merge(MergeConfig(base_model_path=bf16_base, adapter_path=planted, output_dir=out,
                               torch_dtype="float32"))
    assert report["dtype"] == "float32" and report["min_kept"] > 0.99
