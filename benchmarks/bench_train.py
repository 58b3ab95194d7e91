"""CPU training throughput of the demo `small` model through the real entry point, vs data loading.

    python benchmarks/bench_train.py [--dataset_path PREPARED] [--steps 20] [--workers 0]

1. Builds (or reuses) a prepared synthetic dataset and the `small` tiny model.
2. Runs ``riskva_core.train.train`` (the DEMO_CPU recipe, --max_steps N) and reads its
   samples/s and tokens/s.
3. Runs the collator + DataLoader alone over the same samples with the same pixel budget
   and prints data-loading samples/s and its ratio to what training consumes (target >= 5x:
   the loader must never be what the CPU waits on).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _dataset(root: Path, n: int) -> Path:
    from riskva_core.data.prepare import PrepareConfig, prepare
    from riskva_core.synth.generate import synth

    csv = synth(root / "raw", num_images=n, seed=0, num_workers=1)
    prepare(PrepareConfig(csv_path=str(csv), image_base_path=str(root / "raw"), output_path=str(root / "prep"),
                          format="jsonl", num_workers=1))
    return root / "prep"


def main() -> int:
    import torch
    from torch.utils.data import DataLoader

    from riskva_core.train.collate import Collator, SFTDataset
    from riskva_core.model.loading import load_processor
    from riskva_core.train.recipes import DEMO_CPU, DEMO_CPU_MODEL_SIZE, to_argv
    from riskva_core.data.samples import read_samples
    from riskva_core.model.tiny import TinyModelConfig, build_tiny_model
    from riskva_core.train.sft import train
    from riskva_core.train.config import config_from_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset_path", type=Path, help="prepared folder (default: synthesise 60 images)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps to time (default 20)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for both measurements")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = a.dataset_path or _dataset(root, 60)
        model = build_tiny_model(TinyModelConfig(output_dir=root / "model", dataset_path=data, size=DEMO_CPU_MODEL_SIZE))
        argv = to_argv({**DEMO_CPU, "save_steps": 0, "logging_steps": a.steps, "report_to": "none",
                        "dataloader_num_workers": a.workers},
                       model_name_or_path=model, dataset_path=data, output_dir=root / "run", max_steps=a.steps)
        result = train(config_from_args(argv))
        train_sps, train_tps = result["train/samples_per_s"], result["train/tokens_per_s"]

        processor = load_processor(model, DEMO_CPU["min_pixels"], DEMO_CPU["max_pixels"])
        ds = SFTDataset(read_samples(data, "train"), processor, DEMO_CPU["max_length"])
        bs = DEMO_CPU["per_device_train_batch_size"]
        loader = DataLoader(ds, batch_size=bs, shuffle=False, collate_fn=Collator(processor.tokenizer.pad_token_id),
                            num_workers=a.workers)
        n = tokens = 0
        t0 = time.perf_counter()
        for batch in loader:
            n += batch["input_ids"].shape[0]
            tokens += int(batch["attention_mask"].sum())
        dt = time.perf_counter() - t0
        load_sps, load_tps = n / dt, tokens / dt

    print(f"torch threads {torch.get_num_threads()}, DataLoader workers {a.workers}")
    print(f"training (small model, DEMO_CPU, {a.steps} steps): {train_sps:8.2f} samples/s {train_tps:10.1f} tokens/s")
    print(f"collator + DataLoader alone:                {load_sps:8.2f} samples/s {load_tps:10.1f} tokens/s")
    ratio = load_sps / max(train_sps, 1e-9)
    print(f"data loading / training consumption: {ratio:.1f}x (target >= 5x) {'OK' if ratio >= 5 else 'BELOW TARGET'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
