"""Model references (folder / hub id through the HF cache / MLflow URI), the precision policy, recipes."""
from __future__ import annotations

import pytest
import torch

from model_fixtures import make_hf_cache_snapshot, make_prepared_dataset, make_tiny_model
from riskva_core.errors import RiskvaError
from riskva_core.model.loading import load_model, load_processor, resolve_attn_implementation, resolve_dtype
from riskva_core.model.resolve import is_hub_id, resolve_model_ref
from riskva_core.train.recipes import LORA_7B, SEED_GPU, recipe_for_model, resolve

HUB_ID = "Qwen/Qwen2.5-VL-7B-Instruct"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    return make_tiny_model(root / "model", make_prepared_dataset(root / "data", 5))


@pytest.fixture
def hf_cache(tmp_path, tiny, monkeypatch):
    """The tiny model as the 7B's snapshot in a temporary cache, read offline (as HF_HUB_CACHE/HF_HUB_OFFLINE do)."""
    return make_hf_cache_snapshot(tmp_path / "hub", HUB_ID, "abc123", tiny, monkeypatch)


def test_a_hub_id_resolves_to_the_cached_snapshot_and_loads(hf_cache):
    assert resolve_model_ref(HUB_ID) == hf_cache
    model = load_model(HUB_ID)
    # Adapters trained on it record the portable name, not this machine's cache path.
    assert model.name_or_path == HUB_ID and model.dtype == torch.float32
    assert load_processor(HUB_ID).tokenizer is not None


def test_a_missing_model_is_one_line_naming_the_flag_and_what_was_tried(hf_cache, tmp_path, monkeypatch):
    # An empty registry of its own: earlier tests in the process may have pointed MLflow elsewhere.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(RiskvaError, match=r"^--base_model_path Qwen/Qwen2.5-VL-72B-Instruct: not a local folder and "
                       r"not in the Hugging Face cache .*HF_HUB_OFFLINE=1"):
        resolve_model_ref("Qwen/Qwen2.5-VL-72B-Instruct", "--base_model_path")
    with pytest.raises(RiskvaError, match=r"--model_path \./nope: no such model folder"):
        resolve_model_ref("./nope", "--model_path")
    # A name no test registers: mlflow keeps some registry state per process.
    with pytest.raises(RiskvaError, match="--model_path models:/riskva-absent@champion: cannot download from MLflow"):
        resolve_model_ref("models:/riskva-absent@champion", "--model_path")
    assert is_hub_id(HUB_ID) and not is_hub_id(str(tmp_path)) and not is_hub_id("a/b/c")


def test_precision_policy():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype("bf16") == torch.bfloat16
    for fp16 in ("float16", "fp16", torch.float16):
        with pytest.raises(RiskvaError, match="float16 is refused: Qwen2.5-VL's activations exceed fp16's range"):
            resolve_dtype(fp16)
    with pytest.raises(RiskvaError, match="--torch_dtype must be one of auto, bfloat16, float32"):
        resolve_dtype("int8")
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert resolve_attn_implementation("eager", "cpu") == "eager"
    with pytest.raises(RiskvaError, match="flash_attention_2 needs a CUDA GPU and the flash-attn package"):
        resolve_attn_implementation("flash_attention_2", "cpu")


def test_flash_attention_only_in_bf16(tiny, monkeypatch):
    """A GPU with flash-attn, simulated: auto picks it for bf16 only, fp32 with it is refused before loading."""
    import transformers.utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert resolve_attn_implementation("auto", "cuda") == "flash_attention_2"  # auto dtype: bf16 on this GPU
    assert resolve_attn_implementation("auto", "cuda", torch.bfloat16) == "flash_attention_2"
    assert resolve_attn_implementation("auto", "cuda", "float32") == "sdpa"
    assert resolve_attn_implementation("flash_attention_2", "cuda", "bfloat16") == "flash_attention_2"
    with pytest.raises(RiskvaError, match=r"^--attn_implementation flash_attention_2 runs in bfloat16 only .*"
                                          r"use --torch_dtype bfloat16, or sdpa for float32$"):
        load_model(tiny, dtype="float32", attn_implementation="flash_attention_2", device="cuda")


def test_auto_keeps_a_bf16_checkpoint_in_bf16_on_a_cpu_that_computes_it(tmp_path, monkeypatch):
    """The one load policy (infer, merge verification, registration, serving): the 7B's bf16 stays bf16."""
    import json

    from riskva_core.model import loading

    for name, saved in (("bf16", {"dtype": "bfloat16"}), ("old", {"torch_dtype": "bfloat16"}),
                        ("nested", {"text_config": {"dtype": "bfloat16"}}), ("fp32", {"dtype": "float32"}),
                        ("fp16", {"torch_dtype": "float16"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(saved))
    assert [loading.checkpoint_dtype(tmp_path / n) for n in ("bf16", "old", "nested", "fp32", "fp16")] == \
        ["bfloat16", "bfloat16", "bfloat16", "float32", "float16"]
    assert loading.checkpoint_dtype(tmp_path) is None
    assert loading.cpu_supports_bf16()  # a real bf16 matmul on this CPU agrees with float32
    assert resolve_dtype("auto", "cpu", checkpoint=tmp_path / "bf16") == torch.bfloat16
    assert resolve_dtype("auto", "cpu", checkpoint=tmp_path / "fp32") == torch.float32
    assert resolve_dtype("auto", "cpu", checkpoint=tmp_path / "fp16") == torch.float32  # fp16 overflows: fp32
    assert resolve_dtype("float32", "cpu", checkpoint=tmp_path / "bf16") == torch.float32  # explicit wins
    assert resolve_dtype("auto", "cpu") == torch.float32  # training names no checkpoint
    # A CPU (or torch build) without bf16 kernels: float32.
    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu", checkpoint=tmp_path / "bf16") == torch.float32


def test_load_model_applies_dtype_and_attention(tiny):
    model = load_model(tiny, dtype="bfloat16", attn_implementation="sdpa")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "sdpa"


def test_recipe_follows_the_base_model_not_the_devices(tiny, tmp_path, monkeypatch):
    for cuda in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda c=cuda: c)
        assert resolve("auto", str(tiny))[0] == "demo"
        assert resolve("auto", HUB_ID)[0] == "lora" and recipe_for_model(str(tmp_path)) == "lora"
    name, argv = resolve("auto", HUB_ID)
    assert argv[argv.index("--learning_rate") + 1] == "0.0001" == str(LORA_7B["learning_rate"])
    name, argv = resolve("seed", HUB_ID)
    assert argv[argv.index("--learning_rate") + 1] == "5e-06" == str(SEED_GPU["learning_rate"])
    assert {k: v for k, v in LORA_7B.items() if k != "learning_rate"} == {
        k: v for k, v in SEED_GPU.items() if k != "learning_rate"}


def test_train_cli_recipe_flag_expands_and_explicit_flags_win(tiny):
    from riskva_core.train.config import config_from_args

    base = ["--dataset_path", "d", "--output_dir", "o"]
    seed = config_from_args(["--model_name_or_path", HUB_ID, *base, "--recipe", "seed"])
    assert seed.args.learning_rate == 5e-6 and seed.trainable.lora_r == 64
    assert seed.args.bf16 and seed.args.gradient_checkpointing
    auto = config_from_args(["--model_name_or_path", HUB_ID, *base, "--recipe", "auto", "--lora_r", "16"])
    assert auto.args.learning_rate == 1e-4 and auto.trainable.lora_r == 16
    demo = config_from_args(["--model_name_or_path", str(tiny), *base, "--recipe", "auto"])
    assert demo.trainable.train_lm_head and demo.args.learning_rate == 2e-3
    with pytest.raises(RiskvaError, match="--recipe: unknown training recipe 'bogus'"):
        config_from_args(["--model_name_or_path", HUB_ID, *base, "--recipe", "bogus"])
