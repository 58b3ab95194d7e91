"""Merge: standalone safetensors model, judged by what it does against base+adapter, loads without peft."""
from __future__ import annotations

import json
import os

import pytest
import torch

from model_fixtures import make_prepared_dataset, make_tiny_model
from riskva_core.errors import RiskvaError
from riskva_core.model.merge import SURVIVAL_WARNING, MergeConfig, fixed_inputs, main, merge
from riskva_core.model.merge_gate import (NOISE_FACTOR, VERIFIABLE_FACTOR, Probe, computed_in, fixed_image,
                                          gate_passes, judge)
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
    assert report["dtype"] == "float32" and report["max_abs_logit_diff"] < 1e-4 and report["verdict"] == "equivalent"
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
    with pytest.raises(RiskvaError, match="the merge gate runs with sdpa or eager only"):
        MergeConfig(base_model_path=base, adapter_path=adapter_dir, output_dir=tmp_path / "o",
                    attn_implementation="flash_attention_2")
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


def _planted_adapter(base, out, data_root, b_value: float, where: dict[str, float] | None = None):
    """A LoRA adapter on ``base`` whose B matrices are all ``b_value``, or ``where[part]`` for the
    layers whose name contains ``part`` (A keeps peft's init)."""
    model = apply_trainable(load_model(base, dtype="bfloat16"), TrainableArguments(lora_r=4, lora_alpha=8), seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(next((v for k, v in (where or {}).items() if k in n), b_value))
    model.save_pretrained(out, safe_serialization=True)
    save_processor(load_processor(base), out)
    return out


def test_bf16_merge_is_saved_in_bf16_and_judged_against_bf16s_own_noise(adapter, bf16_base):
    from safetensors import safe_open

    root = adapter[0]
    planted = _planted_adapter(bf16_base, root / "strong", root / "data", 0.05)
    out = root / "merged_bf16"
    report = merge(MergeConfig(base_model_path=bf16_base, adapter_path=planted, output_dir=out))
    # The tolerance is measured, not set: NOISE_FACTOR x the base's own bf16-vs-fp32 difference, a
    # share of its logit scale, taken per position at base+adapter's scale there; sdpa attention.
    assert report["dtype"] == "bfloat16" and report["noise_reference"] == "float32"
    assert report["attn_implementation"] == "sdpa"
    assert 0 < report["noise_abs_logit_diff"] and report["noise_factor"] == NOISE_FACTOR
    assert report["tolerance_relative"] == pytest.approx(NOISE_FACTOR * report["noise_relative"])
    assert report["logit_diff_ratio"] <= 1 and report["adapter_effect_ratio"] > VERIFIABLE_FACTOR
    assert report["verdict"] == "equivalent" and report["equivalent"] and not report["effect_lost"]
    # A bf16 merge may flip a near tie of base+adapter's, never a decisive token: which near ties flip
    # follows the CPU's bf16 kernel (oneDNN's on an AMX Xeon flips 2 of 64 here, the AVX2 fallback none).
    assert report["answers_disagree"] == 0 and report["answers_decisive"] > 0 and report["answer_agreement"] >= 0.9
    assert report["answer_positions"] == sum(report["verify_input"]["answer_tokens"])
    assert report["verdict_reason"].startswith("equivalent: ") and "a merge that lost it would have been refused" \
        in report["verdict_reason"]
    assert report["peak_rss_gb"] > 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    saved = json.loads((out / "merge_report.json").read_text())
    assert all(0.5 < v["kept"] <= 1 for v in saved["layers"].values()) and any("q_proj" in k for k in saved["layers"])
    assert saved["warnings"] == []


def test_the_noise_reference_is_the_model_computed_in_float32(adapter, bf16_base, monkeypatch):
    """computed_in widens one module at a time: the same logits as the bf16 weights loaded in fp32."""
    from riskva_core.model import merge_gate

    processor = load_processor(bf16_base)
    model16, model32 = load_model(bf16_base, dtype="bfloat16"), load_model(bf16_base, dtype="float32")
    probe = Probe(model16, processor, PromptTemplate(), [fixed_image()], "cpu", 4)
    with computed_in(model16, torch.float32):
        widened = probe.logits(model16)
    # Large linear layers (the 7B's lm_head) are widened a block of rows at a time: same result.
    monkeypatch.setattr(merge_gate, "WIDE_CHUNK_BYTES", 4096)
    with computed_in(model16, torch.float32):
        blockwise = probe.logits(model16)
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())  # restored exactly
    assert "forward" not in vars(model16.lm_head)
    exact, bf16 = probe.logits(model32), probe.logits(model16)
    # bf16's noise measured to within 10% (what is left: the pixels, rounded to bf16 on the way in).
    assert (widened - exact).abs().max() < 0.1 * (bf16 - exact).abs().max()
    assert (blockwise - widened).abs().max() < 1e-5


def test_an_update_merely_small_in_some_layers_merges_with_a_warning(adapter, bf16_base):
    """B = 1e-6 in layer 0: B·A·scale is ~1e-6 of weights ~0.02 whose bf16 spacing is ~1e-4, so
    it rounds away; it also changes nothing the outputs can tell from bf16 noise: merged."""
    root = adapter[0]
    planted = _planted_adapter(bf16_base, root / "weak", root / "data", 0.05, {"layers.0.": 1e-6})
    out = root / "merged_weak"
    report = merge(MergeConfig(base_model_path=bf16_base, adapter_path=planted, output_dir=out))
    assert report["equivalent"] and report["answer_agreement"] == 1
    (warning,) = json.loads((out / "merge_report.json").read_text())["warnings"]
    assert warning.startswith("the LoRA update of 7 of 14 layers mostly rounded away in bfloat16")
    assert "layers.0.self_attn.q_proj" in warning and "layers.1." not in warning
    # --max_update_error still refuses such layers when asked to, naming them.
    with pytest.raises(RiskvaError, match=r"rounded away in bfloat16 .*layers\.0\.self_attn\.q_proj") as err:
        merge(MergeConfig(base_model_path=bf16_base, adapter_path=planted, output_dir=root / "strict_layers",
                          max_update_error=0.5))
    assert err.value.exit_code == 3 and not (root / "strict_layers").exists()


@pytest.fixture(scope="module")
def cancelling_base(adapter, bf16_base):
    """The bf16 tiny base with one MLP channel of the last layer doubled: channels 0 and 1 compute
    the same activation (ten times larger than the others) and down_proj adds it with weights +1.5
    and -1.5, which cancel exactly. bf16's spacing at 1.5 is 2^-7: a down_proj update of 0.003 on
    channel 0 rounds away when merged, yet unmerged it moves the residual by 0.003 x a large
    activation — an adapter whose effect is real and lost in bf16, as a low-lr LoRA's is on a deep model.
    """
    out = adapter[0] / "base_cancelling"
    model = load_model(bf16_base, dtype="float32")
    mlp = model.model.language_model.layers[-1].mlp
    with torch.no_grad():
        mlp.up_proj.weight[0] *= 10
        mlp.gate_proj.weight[1], mlp.up_proj.weight[1] = mlp.gate_proj.weight[0], mlp.up_proj.weight[0]
        mlp.down_proj.weight[:, 0], mlp.down_proj.weight[:, 1] = 1.5, -1.5
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    save_processor(load_processor(bf16_base), out)
    return out


def test_an_adapter_whose_effect_is_lost_in_bf16_is_refused(adapter, cancelling_base):
    root = adapter[0]
    model = apply_trainable(load_model(cancelling_base, dtype="bfloat16"), TrainableArguments(lora_r=4, lora_alpha=8),
                            seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.zero_()
        down = model.base_model.model.model.language_model.layers[-1].mlp.down_proj
        down.lora_A["default"].weight[0, 0] = 1.0
        # scale alpha/r = 2: B·A·scale = ±0.003 in down_proj's column 0, below half of bf16's 2^-7 there.
        down.lora_B["default"].weight[:, 0] = 0.0015 * (torch.randint(0, 2, (64,), generator=g) * 2 - 1)
    planted = root / "lost"
    model.save_pretrained(planted, safe_serialization=True)
    save_processor(load_processor(cancelling_base), planted)
    out = root / "merged_lost"
    with pytest.raises(RiskvaError, match=r"^merge refused: the adapter's effect is lost in bfloat16: ") as err:
        merge(MergeConfig(base_model_path=cancelling_base, adapter_path=planted, output_dir=out))
    assert err.value.exit_code == 3 and "\n" not in str(err.value) and not out.exists()
    assert " 0 of 0 " not in str(err.value) and "tolerances at most" in str(err.value)
    assert "rounded away in 1 of 14 layers" in str(err.value)
    # In float32 the update survives and the same adapter merges.
    report = merge(MergeConfig(base_model_path=cancelling_base, adapter_path=planted, output_dir=out,
                               torch_dtype="float32"))
    assert report["verdict"] == "equivalent" and report["adapter_changed_answers"] > 0
    assert report["answers_lost_to_base"] == 0


def test_an_adapter_whose_effect_is_within_the_noise_is_unverifiable_never_equivalent(adapter, bf16_base, capsys):
    """B = 1e-6 in every layer: each update rounds away in bf16 (the adapter is lost in the merge)
    and its effect is far inside bf16's own noise, so a merge that kept it and one that lost it
    look alike. Formerly "equivalent"; now saved as unverifiable: a WARN check, evaluation judges."""
    import dagster as dg

    from riskva_assets.model_assets import merge_check, merge_verdict

    root = adapter[0]
    planted = _planted_adapter(bf16_base, root / "faint", root / "data", 1e-6)
    out = root / "merged_faint"
    assert main(["--base_model_path", str(bf16_base), "--adapter_path", str(planted), "--output_dir", str(out)]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert all(v["kept"] < SURVIVAL_WARNING for v in report["layers"].values())  # lost, every layer
    assert report["verdict"] == "unverifiable" and not report["equivalent"] and not report["effect_lost"]
    assert report["adapter_effect_ratio"] <= VERIFIABLE_FACTOR and report["logit_diff_ratio"] <= 1
    assert report["verdict_reason"].startswith("unverifiable: ")
    assert "evaluation is the judge" in report["verdict_reason"]
    assert " 0 of 0 " not in report["verdict_reason"] and (out / "model.safetensors").is_file()
    err = capsys.readouterr().err
    assert "warning: unverifiable: " in err and "evaluation is the judge" in err
    # Registrable (evaluation judges it), but the merge check is not passed: WARN, not blocking.
    check = merge_check(report)
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN and merge_verdict(report)[0]
    assert check.metadata["verdict"].value == "unverifiable" and "evaluation is the judge" in check.description


def _gate_logits(seed: int = 0, positions: int = 64, vocab: int = 256):
    """(base, base_wide, ref, ref_wide): logits of scale ~1, bf16-like noise of 1 % of it, and a
    LoRA effect of 20 % (20 x the noise: clearly visible)."""
    g = torch.Generator().manual_seed(seed)
    base_wide = torch.randn(positions, vocab, generator=g)
    base = base_wide + 0.01 * torch.randn(positions, vocab, generator=g)
    ref_wide = base_wide + 0.2 * torch.randn(positions, vocab, generator=g)
    ref = ref_wide + 0.01 * torch.randn(positions, vocab, generator=g)
    return base, base_wide, ref, ref_wide


def test_an_adapter_that_inflates_its_logits_does_not_widen_its_tolerance():
    """The tolerance is per position, at base+adapter's own scale there, from the base's noise.
    An adapter whose (trained) head makes half the positions' logits 20 x larger, and whose
    effect is lost at the other half, is refused: the former single tolerance, taken at the
    largest logit scale, let exactly that merge through."""
    base, base_wide, ref, ref_wide = _gate_logits()
    g = torch.Generator().manual_seed(1)
    faithful = judge(gate_passes(ref, ref_wide.clone(), base, base_wide),
                     ref + 0.01 * torch.randn(ref.shape, generator=g), torch.bfloat16)
    assert faithful["verdict"] == "equivalent" and faithful["adapter_effect_ratio"] > VERIFIABLE_FACTOR
    assert judge(gate_passes(ref, ref_wide.clone(), base, base_wide), base.clone(), torch.bfloat16)["verdict"] == "lost"

    big = torch.arange(ref.shape[0]) >= ref.shape[0] // 2
    inflated, inflated_wide = ref.clone(), ref_wide.clone()
    inflated[big] *= 20
    inflated_wide[big] *= 20
    merged = inflated.clone()
    merged[~big] = base[~big]  # the effect lost where the logits were not inflated
    verdict = judge(gate_passes(inflated, inflated_wide.clone(), base, base_wide), merged, torch.bfloat16)
    assert verdict["verdict"] in ("lost", "disagree") and not verdict["equivalent"]
    assert verdict["worst_position"] < ref.shape[0] // 2  # it fails where the effect was lost
    assert verdict["tolerance_relative"] == faithful["tolerance_relative"]  # the adapter never enters it
    # The former rule: the base's noise as a share of its max logit, applied at the larger max of the two.
    former = NOISE_FACTOR * float((base - base_wide).abs().max() / base.abs().max()) * float(inflated.abs().max())
    assert float((merged - inflated).abs().max()) < former
    # A faithful merge of the inflating adapter still passes: its rounding grows with its logits.
    scaled_noise = 0.01 * torch.randn(ref.shape, generator=g) * torch.where(big, 20.0, 1.0)[:, None]
    assert judge(gate_passes(inflated, inflated_wide.clone(), base, base_wide), inflated + scaled_noise,
                 torch.bfloat16)["verdict"] == "equivalent"


def test_an_exact_float32_merge_of_a_trained_head_passes():
    """`make demo`'s figures: the demo recipe trains lm_head, so base+adapter's logits are 17x the
    random base's (20.3 vs 1.19). A float32 merge differs from base+adapter by 6.7e-6 there:
    float32 rounding at that scale, not a broken merge. Taken at base+adapter's own scale per
    position it merges; a merge that loses the adapter's effect is still refused."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(32, 64, generator=g) * 0.4
    base = base * (1.19 / base.abs().max())
    ref = base.clone()
    ref[torch.arange(32), torch.arange(32) % 64] = 20.3  # the trained head: confident answers
    noisy_base = base + 7.2e-7 * torch.sign(torch.randn(32, 64, generator=g))
    merged = ref + 6.7e-6 * torch.sign(torch.randn(32, 64, generator=g))
    verdict = judge(gate_passes(ref, ref.clone(), base, noisy_base), merged, torch.float32)
    assert verdict["verdict"] == "equivalent" and verdict["max_abs_logit_diff"] > NOISE_FACTOR * 7.2e-7
    lost = judge(gate_passes(ref, ref.clone(), base, noisy_base), base.clone(), torch.float32)
    assert lost["effect_lost"] and lost["verdict"] == "lost" and lost["answers_lost_to_base"] > 0
