"""LoRA supervised fine-tuning of Qwen2.5-VL on a prepared RisKVA dataset.

One readable loop over accelerate; DeepSpeed ZeRO-2/3 comes from the accelerate config.

Single process (CPU or one GPU, no DeepSpeed):

    riskva train --model_name_or_path MODEL --dataset_path DATA --output_dir OUT
    python -m riskva_core.train --model_name_or_path MODEL --dataset_path DATA --output_dir OUT

Multi-GPU with DeepSpeed ZeRO-2 (the seed's launch line; override --num_processes):

    accelerate launch --config_file configs/deepspeed_zero2.yaml --num_processes 8 \\
        -m riskva_core.train --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct \\
        --dataset_path DATA --output_dir OUT --per_device_train_batch_size 2 \\
        --gradient_accumulation_steps 8 --num_train_epochs 3 --learning_rate 5e-6 \\
        --bf16 --gradient_checkpointing --use_lora True

CPU ranks with DeepSpeed (gloo; what the tests run):

    DS_ACCELERATOR=cpu accelerate launch --config_file configs/deepspeed_zero2.yaml \\
        --num_processes 2 -m riskva_core.train --model_name_or_path MODEL ...

Output (rank 0 writes, atomically): OUT/adapter/ (layout in riskva_core/train/outputs.py),
OUT/checkpoints/checkpoint-STEP/ (resumable with --resume_from_checkpoint), OUT/runs/ (TensorBoard).

Resuming: the data order is a pure function of (seed, epoch), so a resumed run skips the
consumed micro-batches without loading them and continues with the same batches, RNG and
optimizer state; after SIGKILL + resume the adapter matches an uninterrupted run to float
round-off (tests assert max abs diff < 1e-5). SIGTERM/SIGINT set a flag that every rank
checks collectively after each optimizer step: all ranks save a checkpoint and exit 0.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Any, Protocol

from riskva_core.atomic import write_json
from riskva_core.errors import RiskvaError
from riskva_core.data.samples import detect_format, read_samples
from riskva_core.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from riskva_core.train.config import TrainConfig, config_from_args
from riskva_core.train.outputs import dataset_fingerprint, prompt_template, write_adapter
from riskva_core.train.trainable import apply_trainable, count_parameters, param_groups, params_digest, trainable_parameters

DEBUG_HASH_ENV = "RISKVA_DEBUG_PARAM_HASH"      # each rank writes a hash of its trainable params
PAUSE_ENV = "RISKVA_TEST_PAUSE_AFTER_STEP"       # tests: idle after step N until signalled/killed


class Reporter(Protocol):
    def log(self, msg: str) -> None: ...
    def report_metrics(self, step: int, metrics: dict) -> None: ...
    def report_final(self, metadata: dict) -> None: ...


# ---------------------------------------------------------------------------------------------
# Data order: a pure function of (seed, epoch), sharded by rank, resumable without replay


def epoch_order(n: int, seed: int, epoch: int, per_step: int) -> list[int]:
    """A permutation of range(n) padded (wrapping around) to a multiple of ``per_step``."""
    import torch

    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    pad = (-len(order)) % per_step
    while pad:
        take = order[: min(pad, n)]
        order += take
        pad -= len(take)
    return order


def rank_micro_batches(order: list[int], micro: int, world: int, rank: int) -> list[list[int]]:
    """Global micro-batch j = order[j*micro*world : …]; rank r takes its ``micro`` slice."""
    per_global = micro * world
    return [order[j + rank * micro: j + (rank + 1) * micro] for j in range(0, len(order), per_global)]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then decay."""
    warmup = int(math.ceil(cfg.warmup_ratio * total))
    if step < warmup:
        return cfg.learning_rate * (step + 1) / (warmup + 1)
    if cfg.lr_scheduler == "constant" or total <= warmup:
        return cfg.learning_rate
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.lr_scheduler == "linear":
        return cfg.learning_rate * (1.0 - progress)
    floor = 0.1 * cfg.learning_rate
    return floor + 0.5 * (cfg.learning_rate - floor) * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# The run


class _StopFlag:
    """SIGTERM/SIGINT → flag; the loop checks it collectively at step boundaries."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a server): no handler
                pass

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _make_accelerator(cfg: TrainConfig):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    kwargs_handlers = []
    launched = os.environ.get("LOCAL_RANK") is not None  # accelerate launch / torchrun
    if launched and not torch.cuda.is_available():
        # Without this, accelerate+DeepSpeed on CPU reports world size 1 on every rank and
        # the ranks silently train unsynchronised copies.
        kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo"))
    trackers = list(cfg.trackers)
    if "mlflow" in trackers and not os.environ.get("MLFLOW_TRACKING_URI"):
        trackers.remove("mlflow")
    return Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision="bf16" if cfg.bf16 else "no",
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(cfg.output_dir), logging_dir=str(cfg.output_dir / "runs")),
        kwargs_handlers=kwargs_handlers,
    ), trackers


def _fill_deepspeed_auto(accelerator, cfg: TrainConfig) -> None:
    """Fill the JSON's "auto" values from the CLI flags before the engine is built."""
    plugin = accelerator.state.deepspeed_plugin
    plugin.deepspeed_config_process(
        must_match=False,
        train_micro_batch_size_per_gpu=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        train_batch_size=cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        * accelerator.num_processes,
        gradient_clipping=cfg.max_grad_norm,
    )
    for key, want in (("train_micro_batch_size_per_gpu", cfg.per_device_train_batch_size),
                      ("gradient_accumulation_steps", cfg.gradient_accumulation_steps)):
        got = plugin.deepspeed_config.get(key)
        if got != want:
            raise RiskvaError(f"DeepSpeed config sets {key}={got} but the flags ask for {want}; use \"auto\" in the JSON")


def _set_threads(accelerator) -> None:
    import torch

    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes) or 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _batch_to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train(cfg: TrainConfig, reporter: Reporter | None = None) -> dict:
    """Run the training described by ``cfg``; returns the final metrics (on every rank)."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from riskva_core.train.collate import Collator, SFTDataset
    from riskva_core.model.loading import load_model, load_processor, pixel_budget

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    accelerator, trackers = _make_accelerator(cfg)
    use_ds = accelerator.state.deepspeed_plugin is not None
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    _set_threads(accelerator)

    def log(msg: str) -> None:
        if main:
            print(f"[riskva train] {msg}", file=sys.stderr, flush=True)
            if reporter is not None:
                reporter.log(msg)

    log(f"world size {world} ({'DeepSpeed ZeRO-' + str(accelerator.state.deepspeed_plugin.zero_stage) if use_ds else accelerator.distributed_type}), "
        f"device {accelerator.device}")
    torch.manual_seed(cfg.seed)

    # Data ------------------------------------------------------------------------------------
    fmt = detect_format(cfg.dataset_path)
    processor = load_processor(cfg.model_name_or_path, cfg.min_pixels, cfg.max_pixels)
    template, template_dict = prompt_template(cfg)
    train_ds = SFTDataset(read_samples(cfg.dataset_path, "train"), processor, cfg.max_length, template,
                          cache_images=cfg.cache_images, flip_seed=cfg.seed if cfg.augment_flip else None)
    if train_ds.dropped:
        log(f"dropped {len(train_ds.dropped)} training samples longer than --max_length {cfg.max_length} "
            f"(longest {max(n for _, n in train_ds.dropped)} tokens)")
    if len(train_ds) == 0:
        raise RiskvaError(f"{cfg.dataset_path}: no training samples fit --max_length {cfg.max_length}")
    val_ds = None
    if cfg.dataset_path.is_dir():
        try:
            val_ds = SFTDataset(read_samples(cfg.dataset_path, "val"), processor, cfg.max_length, template)
        except RiskvaError:
            val_ds = None
        if val_ds is not None and len(val_ds) == 0:
            val_ds = None
    collate = Collator(pad_id=processor.tokenizer.pad_token_id)
    micro, ga = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    per_step = micro * world * ga
    steps_per_epoch = math.ceil(len(train_ds) / per_step)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    log(f"{fmt} dataset: {len(train_ds)} train samples, {len(val_ds) if val_ds else 0} val; "
        f"{steps_per_epoch} steps/epoch of {per_step} samples; {total_steps} steps")

    # Model -----------------------------------------------------------------------------------
    # --bf16 loads the weights in bf16 (half the host memory; DeepSpeed's bf16 mode keeps fp32
    # master copies of the trainable weights only); otherwise fp32 as before.
    model = load_model(cfg.model_name_or_path, dtype="bfloat16" if cfg.bf16 else "float32")
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_trainable(model, cfg)
    n_trainable, n_total = count_parameters(model)
    log(f"trainable parameters: {n_trainable:,} of {n_total:,} ({100 * n_trainable / n_total:.2f}%)")
    params = list(trainable_parameters(model).values())
    groups = param_groups(model, cfg)
    for group in groups:
        group["lr"] = lr_at(0, total_steps, cfg) * group["lr_scale"]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    if use_ds:
        _fill_deepspeed_auto(accelerator, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)

    # Resume ----------------------------------------------------------------------------------
    start_step = 0
    resume = resolve_resume(cfg)
    if resume is not None:
        start_step = load_checkpoint(accelerator, model, optimizer, resume, use_ds)
        log(f"resumed from {resume} at step {start_step}")
    elif cfg.resume_from_checkpoint == "auto":
        log("no checkpoint to resume from; starting fresh")

    if main and trackers:
        accelerator.init_trackers("riskva-train", config={k: v for k, v in cfg.to_dict().items() if v is not None})

    # Loop ------------------------------------------------------------------------------------
    stop = _StopFlag()
    stop.install()
    pause_after = int(os.environ.get(PAUSE_ENV, "0") or 0)
    step = start_step
    history: list[dict] = []
    window = {"loss": 0.0, "n": 0, "tokens": 0, "samples": 0, "t0": time.perf_counter()}
    t_start = time.perf_counter()
    tokens_seen = 0
    bar = tqdm(total=total_steps, initial=start_step, disable=not main, desc="train", dynamic_ncols=True)
    model.train()
    interrupted = False
    while step < total_steps and not interrupted:
        epoch = step // steps_per_epoch
        order = epoch_order(len(train_ds), cfg.seed, epoch, per_step)
        train_ds.epoch = epoch  # before the DataLoader exists: workers get a copy with it
        batches = rank_micro_batches(order, micro, world, rank)
        skip = (step - epoch * steps_per_epoch) * ga  # consumed micro-batches of this epoch
        # Its own generator: creating a DataLoader iterator draws a seed, and drawing it from the
        # global RNG would shift the dropout masks of a resumed run.
        loader = DataLoader(train_ds, batch_sampler=batches[skip:], collate_fn=collate,
                            num_workers=cfg.dataloader_num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for i, batch in enumerate(loader):
            if i % ga == 0:  # first micro-batch of an optimizer step: set that step's lr
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total_steps, cfg) * group["lr_scale"]
            with accelerator.accumulate(model):
                batch = _batch_to(batch, accelerator.device)
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and not use_ds and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window["loss"] += loss.detach().float().item()
            window["n"] += 1
            n_tok = int(batch["attention_mask"].sum())
            window["tokens"] += n_tok
            tokens_seen += n_tok
            window["samples"] += batch["input_ids"].shape[0]
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)

            if step % cfg.logging_steps == 0 or step == total_steps:
                stats = torch.tensor([window["loss"], window["n"], window["tokens"], window["samples"]],
                                     dtype=torch.float64, device=accelerator.device)
                stats = accelerator.reduce(stats, reduction="sum")
                dt = max(time.perf_counter() - window["t0"], 1e-9)
                metrics = {
                    "train/loss": stats[0].item() / max(stats[1].item(), 1),
                    "train/lr": optimizer.param_groups[0]["lr"],
                    "train/samples_per_s": stats[3].item() / dt,
                    "train/tokens_per_s": stats[2].item() / dt,
                    "train/epoch": step / steps_per_epoch,
                }
                window = {"loss": 0.0, "n": 0, "tokens": 0, "samples": 0, "t0": time.perf_counter()}
                history.append({"step": step, **metrics})
                if main:
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}",
                                    sps=f"{metrics['train/samples_per_s']:.2f}")
                    accelerator.log(metrics, step=step)
                    if reporter is not None:
                        reporter.report_metrics(step, metrics)

            if val_ds is not None and cfg.eval_steps > 0 and step % cfg.eval_steps == 0 and step < total_steps:
                val_loss = evaluate_loss(accelerator, model, val_ds, collate, micro)
                history.append({"step": step, "eval/loss": val_loss})
                log(f"step {step}: eval loss {val_loss:.4f}")
                if main:
                    accelerator.log({"eval/loss": val_loss}, step=step)
                    if reporter is not None:
                        reporter.report_metrics(step, {"eval/loss": val_loss})

            if cfg.save_steps > 0 and step % cfg.save_steps == 0 and step < total_steps:
                save_checkpoint(accelerator, model, optimizer, cfg, step, epoch, use_ds)

            if pause_after and step == pause_after:
                marker = cfg.output_dir / "debug" / f"paused-rank{rank}"
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"{step} {os.getpid()}")  # the harness needs the rank's pid to kill it
                while not stop.requested:  # a test harness SIGKILLs or SIGTERMs us here
                    time.sleep(0.05)

            # Collective: a signal seen on any rank stops all ranks at this same step.
            flag = accelerator.reduce(torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device),
                                      reduction="sum")
            if flag.item() > 0:
                path = save_checkpoint(accelerator, model, optimizer, cfg, step, epoch, use_ds)
                log(f"stop requested: saved {path} at step {step}; resume with --resume_from_checkpoint auto")
                interrupted = True
                break
            if step >= total_steps:
                break
    bar.close()
    stop.restore()
    elapsed = time.perf_counter() - t_start

    if interrupted:
        accelerator.end_training()
        _reset_accelerate_state(world)
        return {"interrupted": True, "step": step}

    # Final -----------------------------------------------------------------------------------
    final: dict[str, Any] = {"step": step, "total_steps": total_steps}
    if val_ds is not None:
        final["eval/loss"] = evaluate_loss(accelerator, model, val_ds, collate, micro)
        log(f"final eval loss {final['eval/loss']:.4f}")
    train_losses = [h["train/loss"] for h in history if "train/loss" in h]
    final.update({
        "train/loss": train_losses[-1] if train_losses else None,
        "train/loss_first": train_losses[0] if train_losses else None,
        "train/runtime_s": elapsed,
        "train/samples_per_s": (step - start_step) * per_step / max(elapsed, 1e-9),
        "train/tokens_per_s": tokens_seen * world / max(elapsed, 1e-9),
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "train_samples": len(train_ds),
        "dropped_over_max_length": len(train_ds.dropped),
        "world_size": world,
    })
    unwrapped = accelerator.unwrap_model(model)
    if os.environ.get(DEBUG_HASH_ENV):
        dbg = cfg.output_dir / "debug"
        dbg.mkdir(parents=True, exist_ok=True)
        write_json(dbg / f"rank{rank}.json", {"rank": rank, "world_size": world, "digest": params_digest(unwrapped)})
    state_dict = None
    if use_ds and accelerator.state.deepspeed_plugin.zero_stage == 3:
        state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 partitions (all ranks)
    if main:
        write_adapter(cfg, unwrapped, processor, template_dict, final, history, state_dict)
        final["adapter_dir"] = str(cfg.output_dir / "adapter")
        if trackers:
            accelerator.log({k: v for k, v in final.items() if isinstance(v, (int, float)) and v is not None},
                            step=step)
        if reporter is not None:
            reporter.report_final({**final, "pixel_budget": pixel_budget(processor),
                                   "dataset_fingerprint": dataset_fingerprint(cfg.dataset_path)})
        log(f"wrote {cfg.output_dir / 'adapter'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    _reset_accelerate_state(world)
    return final


def _reset_accelerate_state(world: int) -> None:
    """Let a second in-process train() start clean (tests, notebooks); launched runs just exit."""
    if world > 1:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def evaluate_loss(accelerator, model, dataset, collate, micro: int) -> float:
    """Mean token loss over the validation split, sharded across ranks."""
    import torch
    from torch.utils.data import DataLoader

    world, rank = accelerator.num_processes, accelerator.process_index
    idx = list(range(rank, len(dataset), world))
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_sampler=[idx[i:i + micro] for i in range(0, len(idx), micro)],
                                collate_fn=collate, generator=torch.Generator().manual_seed(0)):
            batch = _batch_to(batch, accelerator.device)
            n = (batch["labels"][:, 1:] != -100).sum()
            total[0] += model(**batch).loss.double() * n
            total[1] += n
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1].clamp(min=1))


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(argv, description=__doc__)
    result = train(cfg)
    return 0 if result.get("step") else 1

