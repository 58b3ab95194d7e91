"""Qwen2.5-VL-7B LoRA training + generation throughput on one GPU, with random bf16 weights.

    python benchmarks/gpu_7b_lora.py                 # H200: ~5-7 minutes, prints a summary
    python benchmarks/gpu_7b_lora.py --dry_run_tiny  # CPU: same code path on a shrunk config

No hub access: the real 7B architecture is built in code from the published numbers
(/work/shared/qwen2_5_vl/REFERENCE.md) directly on the GPU in bf16. Training is the
project's recipe shape: LoRA r 64 / alpha 128 on the language model's q,k,v,o,gate,up,down
(the same target regex riskva_core.train uses), DeepSpeed ZeRO-2 (single process,
deepspeed.initialize), gradient checkpointing, 1 image + text = 2,048 tokens per sample
(image 64x64 patches -> 1,024 image tokens, loss on the last 512 text tokens).

Prints tokens/s, MFU (6·N·tokens + attention convention, against 989 TFLOPS dense bf16 for
H200) and peak GPU memory next to the ms-swift anchor (20-22 GiB for 7B LoRA at max_pixels
1,003,520 and 2-4k tokens), then merged-model greedy generation throughput at batch 1/8/32
(256 image tokens + 64 prompt tokens, 128 new tokens each).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H200_BF16_PEAK = 989e12
SWIFT_ANCHOR_GIB = (20, 22)


def build_config(tiny: bool):
    from transformers import Qwen2_5_VLConfig

    if tiny:
        text = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, mrope=[2, 3, 3])
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1])
    else:  # REFERENCE.md: Qwen2.5-VL-7B-Instruct
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, mrope=[16, 24, 24])
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      fullatt_block_indexes=[7, 15, 23, 31])
    mrope = text.pop("mrope")
    cfg = Qwen2_5_VLConfig(
        text_config=dict(max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                         use_cache=False, **text),
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           tokens_per_second=2, hidden_act="silu", **vision),
        tie_word_embeddings=False,
    )
    # The released special-token ids are Qwen2_5_VLConfig's defaults (REFERENCE.md); the
    # vocabulary below them is free for random text tokens.
    if tiny:
        cfg.text_config.bos_token_id, cfg.text_config.eos_token_id = 0, 1
        cfg.image_token_id, cfg.video_token_id = 1000, 1001
        cfg.vision_start_token_id, cfg.vision_end_token_id = 1002, 1003
    return cfg


def build_model(cfg, device, dtype):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    t0 = time.perf_counter()
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    # Random weights, drawn on the device (fast); norms stay at their init of 1.
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=g)
    n = sum(p.numel() for p in model.parameters())
    n_vis = sum(p.numel() for p in model.model.visual.parameters())
    print(f"built {n / 1e9:.2f} B params ({n_vis / 1e9:.2f} B vision) on {device} in {time.perf_counter() - t0:.1f}s",
          flush=True)
    return model, n, n_vis


def make_batch(cfg, batch: int, seq_len: int, grid: int, device, dtype, label_tokens: int, seed: int = 0):
    """1 image (grid x grid patches) + random text, padded to exactly seq_len tokens per sample."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n_img = grid * grid // 4
    n_text = seq_len - n_img - 2
    if n_text < label_tokens + 8:
        raise SystemExit(f"--seq_len {seq_len} too short for {n_img} image tokens")
    high = min(cfg.image_token_id, cfg.vision_start_token_id, cfg.text_config.vocab_size) - 1
    rows, types = [], []
    for _ in range(batch):
        head = torch.randint(0, high, (8,), generator=g)
        tail = torch.randint(0, high, (n_text - 8,), generator=g)
        ids = torch.cat([head, torch.tensor([cfg.vision_start_token_id]),
                         torch.full((n_img,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id]), tail])
        t = torch.zeros_like(ids)
        t[9:9 + n_img] = 1
        rows.append(ids)
        types.append(t)
    input_ids = torch.stack(rows)
    labels = torch.full_like(input_ids, -100)
    labels[:, -label_tokens:] = input_ids[:, -label_tokens:]
    patch_dim = 3 * 2 * 14 * 14
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "mm_token_type_ids": torch.stack(types).to(device),
        "pixel_values": torch.randn(batch * grid * grid, patch_dim, generator=g).to(device=device, dtype=dtype),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * batch).to(device),
        "labels": labels.to(device),
    }


def train_flops(cfg, n_lm: int, n_vis: int, batch: int, seq_len: int, grid: int) -> float:
    """6·N·T for the LM (non-embedding params) + attention, same for the ViT on its patches."""
    tc, vc = cfg.text_config, cfg.vision_config
    lm = 6 * n_lm * seq_len + 12 * tc.num_hidden_layers * tc.hidden_size * seq_len * seq_len / 2
    patches = grid * grid
    full = len(vc.fullatt_block_indexes)
    window = (vc.window_size // vc.patch_size) ** 2
    vis_attn = 12 * vc.hidden_size * patches * (full * patches + (vc.depth - full) * window)
    return batch * (lm + 6 * n_vis * patches + vis_attn)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry_run_tiny", action="store_true", help="shrunk config on CPU: checks the code path only")
    ap.add_argument("--seq_len", type=int, default=2048, help="tokens per training sample (default 2048)")
    ap.add_argument("--grid", type=int, default=64, help="image patches per side (64 -> 1024 image tokens)")
    ap.add_argument("--batch", type=int, default=1, help="training micro-batch (default 1)")
    ap.add_argument("--steps", type=int, default=8, help="timed training steps after 2 warm-up steps")
    ap.add_argument("--gen_batches", default="1,8,32", help="generation batch sizes")
    ap.add_argument("--new_tokens", type=int, default=128, help="tokens generated per sequence")
    ap.add_argument("--out", type=Path, default=None, help="also write the summary JSON here")
    a = ap.parse_args()

    tiny = a.dry_run_tiny
    if tiny:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        a.seq_len, a.grid, a.steps, a.new_tokens = 256, 16, 2, 4
        a.gen_batches = "1,2"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)

    import deepspeed
    import torch
    from peft import LoraConfig, get_peft_model

    from riskva_core.train.config import TrainableArguments

    cuda = torch.cuda.is_available() and not tiny
    if not cuda and not tiny:
        raise SystemExit("no CUDA device: run with --dry_run_tiny to check the code path on CPU")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    t_all = time.perf_counter()

    cfg = build_config(tiny)
    model, n_all, n_vis = build_model(cfg, device, dtype)
    n_embed = model.model.language_model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    n_lm = n_all - n_vis - n_embed + model.lm_head.weight.numel()  # lm_head matmul counts, the lookup does not
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    target = TrainableArguments(lora_r=64, lora_alpha=128).lora_target_regex()
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, target_modules=target,
                                             bias="none", task_type="CAUSAL_LM"))
    for n, p in model.named_parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not any("visual" in n for n, p in model.named_parameters() if p.requires_grad)
    print(f"LoRA r64: {n_lora / 1e6:.1f} M trainable params", flush=True)

    ds_config = {
        "train_micro_batch_size_per_gpu": a.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": cuda},
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **({"fused": True} if cuda else {}))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)

    batch = make_batch(cfg, a.batch, a.seq_len, a.grid, device, dtype, label_tokens=min(512, a.seq_len // 4))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = []

    def step() -> None:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())

    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = a.steps * a.batch * a.seq_len
    flops = train_flops(cfg, n_lm, n_vis, a.batch, a.seq_len, a.grid) * a.steps
    summary = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (dry run)",
        "params_b": round(n_all / 1e9, 3), "lora_params_m": round(n_lora / 1e6, 1),
        "seq_len": a.seq_len, "image_tokens": a.grid * a.grid // 4, "batch": a.batch,
        "train_s_per_step": dt / a.steps, "train_tokens_per_s": tokens / dt,
        "mfu": (flops / dt) / H200_BF16_PEAK if cuda else None,
        "loss_first_last": [losses[0], losses[-1]],
    }
    if cuda:
        summary["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        summary["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    print(f"train: {summary['train_tokens_per_s']:.0f} tokens/s, {summary['train_s_per_step']:.2f} s/step"
          + (f", MFU {summary['mfu'] * 100:.1f}%" if cuda else ""), flush=True)
    if cuda:
        lo, hi = SWIFT_ANCHOR_GIB
        print(f"peak GPU memory {summary['peak_mem_gib']:.1f} GiB allocated / {summary['peak_reserved_gib']:.1f} GiB "
              f"reserved vs ms-swift anchor {lo}-{hi} GiB (ratio {summary['peak_mem_gib'] / ((lo + hi) / 2):.2f}x)",
              flush=True)

    # Generation: fold the adapter in, free the optimizer, greedy-decode fixed-length outputs.
    gen_model = engine.module.merge_and_unload().eval()
    del engine, opt, params
    if cuda:
        torch.cuda.empty_cache()
    gen_model.config.use_cache = True
    gen_model.gradient_checkpointing_disable()
    summary["generate"] = {}
    for bs in [int(x) for x in a.gen_batches.split(",")]:
        gb = make_batch(cfg, bs, (16 if tiny else 32) ** 2 // 4 + 2 + 64, 16 if tiny else 32, device, dtype,
                        label_tokens=1, seed=bs)
        gb.pop("labels")
        with torch.no_grad():
            gen_model.generate(**gb, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = gen_model.generate(**gb, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)
            if cuda:
                torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        new = (out.shape[1] - gb["input_ids"].shape[1]) * bs
        summary["generate"][bs] = {"tokens_per_s": new / dt, "s": dt}
        print(f"generate batch {bs:>2}: {new / dt:8.1f} new tokens/s ({dt:.1f}s for {a.new_tokens} tokens)", flush=True)
    if cuda:
        summary["peak_mem_gib_total"] = torch.cuda.max_memory_allocated(device) / 2**30
    summary["wall_s"] = time.perf_counter() - t_all
    print(json.dumps(summary, indent=2, default=str))
    if a.out:
        a.out.write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
