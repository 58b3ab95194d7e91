"""Resumable checkpoints: checkpoint-STEP/{trainable.safetensors, optimizer.pt | ds/, trainer_state.json}.

Every rank calls ``save_checkpoint``; the folder is written under a temporary name and renamed
when complete, and ``trainer_state.json`` is written last, so only complete checkpoints are
listed. Under DeepSpeed the optimizer state is DeepSpeed's own per-rank format.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from riskva_core.atomic import write_json
from riskva_core.errors import RiskvaError
from riskva_core.train.config import TrainConfig
from riskva_core.train.trainable import trainable_parameters

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = CHECKPOINT_RE.match(d.name)
        if m and (d / "trainer_state.json").is_file():  # written last: only complete ones count
            found.append((int(m.group(1)), d))
    return sorted(found)


def resolve_resume(cfg: TrainConfig) -> Path | None:
    if cfg.resume_from_checkpoint in (None, "", "none", "None"):
        return None
    if cfg.resume_from_checkpoint == "auto":
        found = list_checkpoints(cfg.output_dir)
        return found[-1][1] if found else None
    path = Path(cfg.resume_from_checkpoint)
    if not (path / "trainer_state.json").is_file():
        raise RiskvaError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no trainer_state.json)")
    return path


def save_checkpoint(accelerator, model, optimizer, cfg: TrainConfig, step: int, epoch: int, use_ds: bool) -> Path:
    """All ranks call this. Written under a temporary name, renamed when complete."""
    import torch
    from safetensors.torch import save_file

    root = cfg.output_dir / "checkpoints"
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if use_ds:
        # DeepSpeed's own format (per-rank ZeRO optimizer shards; torch files it loads itself);
        # frozen base weights are excluded: a checkpoint of a 7B LoRA run stays small.
        model.save_checkpoint(str(tmp / "ds"), tag="state", exclude_frozen_parameters=True)
    unwrapped = accelerator.unwrap_model(model)
    rng = torch.get_rng_state()
    save_file({"cpu": rng}, str(tmp / f"rng_rank{accelerator.process_index}.safetensors"))
    if accelerator.is_main_process:
        tensors = {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(unwrapped).items()}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        if not use_ds:
            torch.save(optimizer.optimizer.state_dict() if hasattr(optimizer, "optimizer") else optimizer.state_dict(),
                       tmp / "optimizer.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "trainer_state.json", {"step": step, "epoch": epoch, "world_size": accelerator.num_processes,
                                               "seed": cfg.seed})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in list_checkpoints(cfg.output_dir)[: -cfg.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, model, optimizer, path: Path, use_ds: bool) -> int:
    """Restore weights, optimizer and RNG; returns the optimizer step to continue from."""
    import torch
    from safetensors.torch import load_file

    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    if state.get("world_size") != accelerator.num_processes:
        raise RiskvaError(f"{path}: saved with {state.get('world_size')} ranks, now {accelerator.num_processes}; "
                          "resume with the same --num_processes")
    unwrapped = accelerator.unwrap_model(model)
    if use_ds:
        model.load_checkpoint(str(path / "ds"), tag="state", load_module_strict=False,
                              load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        params = trainable_parameters(unwrapped)
        saved = load_file(str(path / "trainable.safetensors"))
        if set(saved) != set(params):
            raise RiskvaError(f"{path}: trainable parameters differ from this run's configuration")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        target = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        target.load_state_dict(opt_state)
    rng_file = path / f"rng_rank{accelerator.process_index}.safetensors"
    if rng_file.is_file():
        torch.set_rng_state(load_file(str(rng_file))["cpu"])
    return int(state["step"])
