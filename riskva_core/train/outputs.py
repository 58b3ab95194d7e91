"""What a training run leaves behind: the ``adapter/`` layout that merge, inference and the
Dagster assets read, and the identity of the data it was trained on.

    OUT/adapter/   adapter_model.safetensors (+ modules_to_save), adapter_config.json, the
                   processor with the training pixel policy, prompt_template.json,
                   training_args.json, metrics.json, dataset.json (fingerprint)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from riskva_core.atomic import atomic_dir, write_json
from riskva_core.data.conversation import PromptTemplate
from riskva_core.data.image_policy import save_image_policy
from riskva_core.data.samples import detect_format, split_file
from riskva_core.train.config import DataArguments, TrainConfig


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


def prompt_template(data: DataArguments) -> tuple[PromptTemplate | None, dict | None]:
    """(template to rebuild conversations with or None, template dict to save with the adapter)."""
    if data.prompt_config is not None:
        t = PromptTemplate.load(data.prompt_config)
        return t, t.to_dict()
    info = data.dataset_path / "dataset_info.json" if data.dataset_path.is_dir() else None
    if info is not None and info.is_file():
        try:
            saved = json.loads(info.read_text(encoding="utf-8")).get("prompt_template")
        except json.JSONDecodeError:
            saved = None
        if isinstance(saved, dict):
            return None, saved
    return None, None


def write_model_extras(folder: Path, processor, dataset_path: Path, template_dict: dict | None) -> None:
    """What a model folder needs besides weights: the processor with its pixel budget, the image
    policy and the prompt template. Written into ``adapter/`` and into every ``checkpoint-N``."""
    from riskva_core.model.loading import save_processor

    save_processor(processor, folder)
    save_image_policy(dataset_path, folder)  # prepare's image steps, so serving repeats them
    if template_dict is not None:
        write_json(folder / "prompt_template.json", template_dict)


def write_metrics(folder: Path, trainer, final: dict) -> None:
    """metrics.json: the final figures and Trainer's log history (rank 0 calls it)."""
    write_json(Path(folder) / "metrics.json", {"final": final, "history": trainer.state.log_history})


def write_adapter(cfg: TrainConfig, trainer, processor, template_dict, final: dict) -> Path:
    """OUT/adapter: weights (safetensors), processor with pixel policy, args, metrics, dataset id.

    Every rank calls it: ``Trainer.save_model`` gathers ZeRO-3 partitions collectively (PEFT
    weights incl. ``modules_to_save``); rank 0 writes into a temporary sibling, renamed when whole.
    """
    from accelerate.utils import broadcast_object_list

    from riskva_core.model.loading import pixel_budget

    target = cfg.output_dir / ("adapter" if cfg.trainable.use_lora else "model")
    main = trainer.is_world_process_zero()
    with contextlib.ExitStack() as stack:
        tmp = [str(stack.enter_context(atomic_dir(target))) if main else None]
        if trainer.args.world_size > 1:
            broadcast_object_list(tmp)  # the other ranks only pass the path through save_model
        trainer.save_model(tmp[0])
        if main:
            folder = Path(tmp[0])
            budget = pixel_budget(processor)
            write_model_extras(folder, processor, cfg.data.dataset_path, template_dict)
            write_json(folder / "training_args.json", {**cfg.to_dict(), "pixel_budget": budget,
                                                       "world_size": final["world_size"]})
            write_metrics(folder, trainer, final)
            write_json(folder / "dataset.json", {
                "dataset_path": str(cfg.data.dataset_path), "format": detect_format(cfg.data.dataset_path),
                "fingerprint": dataset_fingerprint(cfg.data.dataset_path),
                "train_samples": final["train_samples"],
                "dropped_over_max_length": final["dropped_over_max_length"]})
            (folder / "training_args.bin").unlink(missing_ok=True)  # Trainer's pickle: JSON above instead
    trainer.accelerator.wait_for_everyone()
    return target
