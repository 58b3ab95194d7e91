"""What a training run leaves behind: the ``adapter/`` layout that merge, inference and the
Dagster assets read, and the identity of the data it was trained on.

    OUT/adapter/   adapter_model.safetensors (+ modules_to_save), adapter_config.json, the
                   processor with the training pixel policy, image_policy.json, prompt_template.json,
                   training_args.json, metrics.json, dataset.json (fingerprint)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from riskva_core.atomic import atomic_dir, write_json
from riskva_core.data.conversation import PromptTemplate
from riskva_core.data.image_policy import save_image_policy
from riskva_core.data.samples import detect_format, split_file
from riskva_core.train.config import TrainConfig


def dataset_fingerprint(dataset_path: Path) -> str:
    info = dataset_path / "dataset_info.json" if dataset_path.is_dir() else None
    if info is not None and info.is_file():
        try:
            fp = json.loads(info.read_text(encoding="utf-8")).get("fingerprint")
            if fp:
                return str(fp)
        except json.JSONDecodeError:
            pass
    h = hashlib.sha256()
    with split_file(dataset_path, "train").open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def prompt_template(cfg: TrainConfig) -> tuple[PromptTemplate | None, dict | None]:
    """(template to rebuild conversations with or None, template dict to save with the adapter)."""
    if cfg.prompt_config is not None:
        t = PromptTemplate.load(cfg.prompt_config)
        return t, t.to_dict()
    info = cfg.dataset_path / "dataset_info.json" if cfg.dataset_path.is_dir() else None
    if info is not None and info.is_file():
        try:
            saved = json.loads(info.read_text(encoding="utf-8")).get("prompt_template")
        except json.JSONDecodeError:
            saved = None
        if isinstance(saved, dict):
            return None, saved
    return None, None


def write_adapter(cfg: TrainConfig, model, processor, template_dict, final: dict, history: list[dict],
                  state_dict=None) -> Path:
    """OUT/adapter: weights (safetensors), processor with pixel policy, args, metrics, dataset id."""
    from riskva_core.model.loading import pixel_budget, save_processor

    target = cfg.output_dir / ("adapter" if cfg.use_lora else "model")
    budget = pixel_budget(processor)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        save_processor(processor, tmp)
        save_image_policy(cfg.dataset_path, tmp)  # prepare's image steps, so serving repeats them
        if template_dict is not None:
            write_json(tmp / "prompt_template.json", template_dict)
        write_json(tmp / "training_args.json", {**cfg.to_dict(), "pixel_budget": budget,
                                                "world_size": final["world_size"]})
        write_json(tmp / "metrics.json", {"final": final, "history": history})
        samples_fmt = detect_format(cfg.dataset_path)
        write_json(tmp / "dataset.json", {"dataset_path": str(cfg.dataset_path), "format": samples_fmt,
                                          "fingerprint": dataset_fingerprint(cfg.dataset_path),
                                          "train_samples": final["train_samples"],
                                          "dropped_over_max_length": final["dropped_over_max_length"]})
    return target
