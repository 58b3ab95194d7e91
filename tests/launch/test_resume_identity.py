"""Resume identity from what the flags and the code mean (riskva_core/launch/resume.py): spellings of
the same configuration and docstring/comment edits resume the run; a real change does not."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from riskva_core.errors import RiskvaError
from riskva_core.launch.resume import (IDENTITY_FILE, LINEAGE_FILE, SUPERSEDED_DIR, finished_run_record,
                                       lineage_differences, lineage_tags, mark_complete, plan_resume, run_identity,
                                       source_version, train_config, write_lineage)

BASE = ["--model_name_or_path", "/m", "--dataset_path", "/d", "--output_dir", "/o", "--recipe", "demo"]
DATA = {"sft_jsonl": "aaaa", "base_model": "bbbb"}


def _identity(*flags: str, **kw) -> dict:
    return run_identity([*BASE, *flags], DATA, "/m", code_version=kw.pop("code_version", "c1"), **kw)


def test_the_same_configuration_spelled_differently_is_one_identity():
    first = _identity("--max_steps", "4", "--learning_rate", "1e-4", "--report_to", "tensorboard")
    same = [
        # more integrations to report to (the space-separated form, which the parser itself would refuse,
        # and the comma list it takes), or none at all: where the run reports does not change the weights
        _identity("--max_steps", "4", "--learning_rate", "1e-4", "--report_to", "tensorboard", "mlflow"),
        _identity("--max_steps", "4", "--learning_rate", "1e-4", "--report_to=tensorboard,mlflow"),
        _identity("--max_steps", "4", "--learning_rate", "1e-4"),
        # --x=v for --x v, another spelling of the number, the dash alias, the flag order
        _identity("--max_steps=4", "--learning_rate=0.0001"),
        _identity("--learning-rate", "0.0001", "--max-steps", "4"),
        # the recipe's own value given explicitly (demo's seed is 0), logging and loader knobs
        _identity("--max_steps", "4", "--learning_rate", "1e-4", "--seed", "0", "--logging_steps", "1",
                  "--disable_tqdm", "True", "--dataloader_num_workers", "2", "--no_dataloader_pin_memory"),
    ]
    for other in same:
        assert other == first
    assert "report_to" not in first["train_config"] and first["train_config"]["seed"] == 0
    # What the flags mean is kept: every other value changes the identity.
    for flags in (("--max_steps", "5"), ("--max_steps", "4", "--seed", "1"), ("--max_steps", "4", "--lora_r", "8"),
                  ("--max_steps", "4", "--recipe", "lora")):
        assert _identity("--learning_rate", "1e-4", *flags)["train_config_sha256"] != first["train_config_sha256"]
    # Save cadence is neutral unless the result is picked among the saved checkpoints.
    assert _identity("--save_steps", "5") == _identity("--save_steps", "7")
    best = ("--load_best_model_at_end", "True", "--eval_strategy", "steps")
    assert _identity(*best, "--save_steps", "5") != _identity(*best, "--save_steps", "10")


def test_a_flag_that_does_not_parse_is_one_line_naming_it():
    with pytest.raises(RiskvaError, match=r"^training flags: .*--max_steps.*invalid int value: 'four'"):
        train_config([*BASE, "--max_steps", "four"])
    assert train_config([*BASE, "--not_a_flag", "1"])["unparsed_flags"] == ["--not_a_flag", "1"]


def _checkpoint(out: Path, step: int) -> None:
    (out / f"checkpoint-{step}").mkdir(parents=True)
    (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")


def test_a_retry_with_another_spelling_resumes_and_a_finished_adapter_is_moved_aside(tmp_path: Path):
    out = tmp_path / "train"
    plan_resume(out, _identity("--max_steps", "4", "--report_to", "tensorboard"))
    _checkpoint(out, 2)
    plan = plan_resume(out, _identity("--max_steps=4", "--report_to", "tensorboard", "mlflow"))
    assert plan.action == "resume"
    # The run finishes: its adapter and record exist only now.
    identity = json.loads((out / IDENTITY_FILE).read_text())
    adapter = out / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights of run 1")
    record = finished_run_record(identity, adapter, data_versions={**DATA, "raw_metadata": "rrrr"},
                                 code_versions={"lora_adapter": "c1"}, base_model={"name": "demo"}, step=4,
                                 dataset_version="v1")
    write_lineage(adapter, record)
    mark_complete(out, identity, record["adapter_version"], 4)
    assert plan_resume(out, identity, record["adapter_version"]).action == "reuse"
    # Other data: the finished adapter goes aside WITH its record, so nothing is left to be merged
    # under the new data version if the new run fails.
    other_data = run_identity([*BASE, "--max_steps", "4"], {**DATA, "sft_jsonl": "cccc"}, "/m", code_version="c1")
    plan = plan_resume(out, other_data, record["adapter_version"])
    assert plan.action == "fresh" and not adapter.exists() and not (out / "run_complete.json").exists()
    assert json.loads((plan.superseded / "adapter" / LINEAGE_FILE).read_text()) == record
    assert plan.superseded.parent == out / SUPERSEDED_DIR
    # A leftover adapter without checkpoints (a run saved with --save_steps 0) is moved aside as well.
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights of run 2")
    plan = plan_resume(out, _identity("--max_steps", "6"))
    assert plan.why.startswith("no checkpoint yet (adapter/ of an earlier run): moved them to ")
    assert (plan.superseded / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights of run 2"


def test_lineage_differences_name_what_changed_and_tags_come_from_the_record_alone(tmp_path: Path):
    record = {"data_versions": {"sft_jsonl": "aaaa", "base_model": "bbbb"}, "code_versions": {"lora_adapter": "c1"},
              "base_model": {"name": "Qwen/Qwen2.5-VL-7B-Instruct", "identity": "Qwen/Qwen2.5-VL-7B-Instruct@c0ffee",
                             "revision": "c0ffee"}, "seed": 0, "recipe": "demo", "adapter_version": "ad",
              "run_identity": "rid", "train_config_sha256": "cfg", "step": 3, "dataset_version": "v1"}
    assert lineage_differences(record, {"sft_jsonl": "aaaa", "base_model": "bbbb"}, {"lora_adapter": "c1"}) == []
    assert lineage_differences(record, {"sft_jsonl": "zzzz", "base_model": "bbbb", "raw_metadata": "r2"},
                               {"lora_adapter": "c2"}) == [
        "raw_metadata data version none vs r2", "sft_jsonl data version aaaa vs zzzz",
        "lora_adapter code version c1 vs c2"]
    # Unknown now (never materialized here): nothing to compare with.
    assert lineage_differences(record, {}, {}) == []
    tags = lineage_tags(record)
    assert tags == lineage_tags(json.loads(json.dumps(record)))  # a function of the record only
    assert {k: tags[k] for k in ("data_version.sft_jsonl", "code_version.lora_adapter", "base_model.revision",
                                 "train.seed", "train.run_identity", "dataset_version")} == {
        "data_version.sft_jsonl": "aaaa", "code_version.lora_adapter": "c1", "base_model.revision": "c0ffee",
        "train.seed": "0", "train.run_identity": "rid", "dataset_version": "v1"}


def test_code_version_follows_code_not_docstrings_comments_or_config_comments(tmp_path: Path):
    core = tmp_path / "riskva_core" / "train"
    core.mkdir(parents=True)
    src = core / "step.py"
    original = ('"""Module docstring."""\nimport math\n\n\nclass Step:\n    """Class docstring."""\n\n'
                '    def lr(self, x):\n        """Docstring."""\n        return math.sqrt(x)  # the rule\n')
    src.write_text(original)
    conf = tmp_path / "ds.json"
    conf.write_text('{"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}')
    yaml_conf = tmp_path / "acc.yaml"
    yaml_conf.write_text("distributed_type: DEEPSPEED\nnum_processes: 8\n")
    sources = ("riskva_core/train/step.py", "ds.json", "acc.yaml")
    before = source_version(sources, tmp_path)
    # Docstrings, comments, blank lines and layout: the same code.
    src.write_text(original.replace("Module docstring.", "The step, explained at length.")
                   .replace('        """Docstring."""\n', '        """Another\n        docstring."""\n\n')
                   .replace("  # the rule", "  # sqrt: see the paper"))
    conf.write_text('{\n  "bf16": {"enabled": "auto"},\n  "zero_optimization": {"stage": 2}\n}\n')
    yaml_conf.write_text("# one rank per GPU\ndistributed_type: DEEPSPEED\nnum_processes: 8  # 8-GPU host\n")
    assert source_version(sources, tmp_path) == before
    # A real change to the code or to a config value: another version.
    src.write_text(original.replace("math.sqrt(x)", "math.sqrt(x) * 2"))
    assert source_version(sources, tmp_path) != before
    src.write_text(original)
    yaml_conf.write_text("distributed_type: DEEPSPEED\nnum_processes: 4\n")
    assert source_version(sources, tmp_path) != before
    # A file that does not parse counts as its bytes (running it fails anyway).
    yaml_conf.write_text("distributed_type: DEEPSPEED\nnum_processes: 8\n")
    src.write_text(original + "def broken(:\n")
    broken = source_version(sources, tmp_path)
    assert broken != before and broken == source_version(sources, tmp_path)
