"""Batched generation (riskva infer) vs the seed's one-image-at-a-time loop, same 64 images.

    .venv/bin/python benchmarks/bench_infer.py [--n_images 64] [--batch_size 8] [--size small]

Both paths use the same model, processor, prompt and greedy decoding, in one process; each is
warmed up once before timing. The seed's inference loop processed one image per ``generate``
call; ``Generator.generate`` pads a batch on the left and decodes it in one call. The untrained
model stops at random points, so both paths are capped at the same ``--max_new_tokens`` and
the generated token counts are printed next to the times. The answers of both paths are
compared (they must be identical: left padding changes nothing for greedy decoding).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def seed_loop(gen, images, max_new_tokens: int) -> list[str]:
    """The seed's inference.py shape: one image, one processor call, one generate, per photo."""
    import torch

    out = []
    for img in images:
        messages = gen.template.messages(None)
        text = gen.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = gen.processor(text=[text], images=[img], return_tensors="pt")
        with torch.inference_mode():
            ids = gen.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(gen.processor.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip())
    return out


def batched(gen, images, batch_size: int) -> list[str]:
    out = []
    for start in range(0, len(images), batch_size):
        out.extend(gen.generate(images[start:start + batch_size]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_images", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--size", choices=["tiny", "small"], default="small", help="tiny_model size (default small)")
    args = p.parse_args()

    import torch

    from model_fixtures import make_prepared_dataset, make_tiny_model
    from riskva_core.evaluate.infer import Generator
    from riskva_core.data.samples import SPLITS, read_samples

    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        ds = make_prepared_dataset(Path(tmp) / "ds", args.n_images)
        model = make_tiny_model(Path(tmp) / "model", ds, size=args.size)
        images = [s.load_image() for split in SPLITS for s in read_samples(ds, split)][: args.n_images]
        gen = Generator(model, max_new_tokens=args.max_new_tokens)
        tok = gen.processor.tokenizer

        seed_loop(gen, images[:1], args.max_new_tokens)  # warm-up (allocator, kernels)
        batched(gen, images[: args.batch_size], args.batch_size)

        t0 = time.perf_counter()
        single = seed_loop(gen, images, args.max_new_tokens)
        t_single = time.perf_counter() - t0
        t0 = time.perf_counter()
        multi = batched(gen, images, args.batch_size)
        t_batched = time.perf_counter() - t0

    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in single)
    print(f"model size={args.size}, {len(images)} images, max_new_tokens={args.max_new_tokens}, "
          f"torch threads={torch.get_num_threads()}, ~{n_tokens} answer tokens in all")
    print(f"seed loop (1 image/generate):   {t_single:7.2f} s  {len(images) / t_single:6.2f} img/s")
    print(f"batched (batch {args.batch_size}):            {t_batched:7.2f} s  {len(images) / t_batched:6.2f} img/s")
    print(f"identical answers: {single == multi} ({sum(a == b for a, b in zip(single, multi))}/{len(images)})")
    print(f"speed-up: {t_single / t_batched:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
