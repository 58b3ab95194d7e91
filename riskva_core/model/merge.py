"""Fold a LoRA adapter into its base model, verified, as a standalone safetensors model folder.

    riskva merge --base_model_path MODEL --adapter_path OUT/adapter --output_dir MERGED

The merge runs in float32. Before writing, the merged model and base+adapter (unmerged)
are run on the same fixed input (a fixed drawn image + the training prompt); their logits
must agree to ``--tolerance`` (default 1e-4, max abs diff), or the merge fails with exit
code 3 and nothing is written. The written folder is reloaded with plain transformers (no
peft) and checked against the in-memory merged model too. The output holds the weights
(saved in the base checkpoint's dtype unless ``--save_dtype``), the adapter's processor
(so the training pixel policy carries over), prompt_template.json, the training records
(training_args.json, dataset.json, metrics.json when present) and merge_report.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from riskva_core.atomic import atomic_dir, write_json
from riskva_core.data.conversation import PromptTemplate
from riskva_core.errors import RiskvaError
from riskva_core.model.loading import is_adapter_dir, load_model, load_processor, save_processor

CARRIED_FILES = ("prompt_template.json", "image_policy.json", "training_args.json", "dataset.json", "metrics.json")


@dataclasses.dataclass
class MergeConfig:
    base_model_path: Path
    adapter_path: Path
    output_dir: Path
    tolerance: float = 1e-4
    save_dtype: str = "auto"  # "auto": the base checkpoint's dtype

    def __post_init__(self) -> None:
        self.base_model_path = Path(self.base_model_path)
        self.adapter_path = Path(self.adapter_path)
        self.output_dir = Path(self.output_dir)
        if not self.base_model_path.is_dir():
            raise RiskvaError(f"--base_model_path {self.base_model_path}: no such model folder")
        if not is_adapter_dir(self.adapter_path):
            raise RiskvaError(f"--adapter_path {self.adapter_path}: no adapter_config.json (not a PEFT adapter)")
        if not self.tolerance > 0:
            raise RiskvaError(f"--tolerance must be positive, got {self.tolerance}")
        if self.save_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise RiskvaError(f"--save_dtype must be auto, float32, bfloat16 or float16, got {self.save_dtype!r}")
        if self.output_dir.resolve() in (self.base_model_path.resolve(), self.adapter_path.resolve()):
            raise RiskvaError("--output_dir must differ from the base model and adapter folders")


def fixed_image(size: int = 224) -> Image.Image:
    """A deterministic test picture: gradient wall with a dark crack-like stroke."""
    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            px[x, y] = (120 + x * 100 // size, 110 + y * 90 // size, 100)
    d = ImageDraw.Draw(img)
    d.line([(size // 6, size // 3), (size // 2, size // 2), (5 * size // 6, size // 2 + 10)], fill=(25, 25, 25), width=4)
    return img


def fixed_inputs(processor, template: PromptTemplate) -> dict[str, Any]:
    text = processor.apply_chat_template(template.messages(None), tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text], images=[fixed_image()], return_tensors="pt"))


def _logits(model, inputs: dict) -> Any:
    import torch

    with torch.no_grad():
        return model(**inputs).logits.float()


def _template(adapter_path: Path) -> PromptTemplate:
    f = adapter_path / "prompt_template.json"
    return PromptTemplate.load(f) if f.is_file() else PromptTemplate()


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def merge(cfg: MergeConfig) -> dict[str, Any]:
    """Merge, verify, write; returns the merge report."""
    import torch
    from transformers import AutoModelForImageTextToText

    processor = load_processor(cfg.adapter_path)  # the adapter's processor carries the pixel policy
    template = _template(cfg.adapter_path)
    base_dtype = json.loads((cfg.base_model_path / "config.json").read_text(encoding="utf-8")).get("dtype") \
        or json.loads((cfg.base_model_path / "config.json").read_text(encoding="utf-8")).get("torch_dtype") or "float32"
    save_dtype = base_dtype if cfg.save_dtype == "auto" else cfg.save_dtype

    model = load_model(cfg.base_model_path, adapter_path=cfg.adapter_path, dtype="float32").eval()
    inputs = fixed_inputs(processor, template)
    unmerged = _logits(model, inputs)
    merged_model = model.merge_and_unload().eval()
    merged = _logits(merged_model, inputs)
    max_diff = float((merged - unmerged).abs().max())
    report: dict[str, Any] = {
        "base_model_path": str(cfg.base_model_path),
        "adapter_path": str(cfg.adapter_path),
        "adapter_sha256": _sha256(cfg.adapter_path / "adapter_model.safetensors"),
        "verify_dtype": "float32",
        "verify_input": {"image": "merge.fixed_image(224)", "tokens": int(inputs["input_ids"].shape[1])},
        "max_abs_logit_diff": max_diff,
        "tolerance": cfg.tolerance,
        "save_dtype": save_dtype,
    }
    if not max_diff < cfg.tolerance:
        raise RiskvaError(
            f"merge verification failed: merged vs base+adapter logits differ by {max_diff:.3g} "
            f"(tolerance {cfg.tolerance:g}); nothing written", exit_code=3)

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[save_dtype]
    with atomic_dir(cfg.output_dir) as tmp:
        merged_model.to(dtype).save_pretrained(tmp, safe_serialization=True)
        save_processor(processor, tmp)
        for name in CARRIED_FILES:
            if (cfg.adapter_path / name).is_file():
                shutil.copyfile(cfg.adapter_path / name, tmp / name)
        # The written folder must load with plain transformers (no peft) and give the same logits.
        reloaded = AutoModelForImageTextToText.from_pretrained(
            tmp, dtype=torch.float32, local_files_only=True, trust_remote_code=False, use_safetensors=True).eval()
        if any("lora_" in n for n, _ in reloaded.named_parameters()):
            raise RiskvaError("merged model still contains LoRA parameters")
        # Compared with the pre-save logits; a lower save dtype legitimately rounds, so only fp32 is checked.
        reload_diff = float((_logits(reloaded, inputs) - merged).abs().max()) if dtype == torch.float32 else None
        report["reload_max_abs_logit_diff"] = reload_diff
        if reload_diff is not None and not reload_diff < cfg.tolerance:
            raise RiskvaError(f"reloaded merged model differs by {reload_diff:.3g}; nothing written", exit_code=3)
        write_json(tmp / "merge_report.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="riskva merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model_path", required=True, type=Path, help="the base model folder the adapter was trained on")
    p.add_argument("--adapter_path", required=True, type=Path, help="the PEFT adapter folder (OUT/adapter of riskva train)")
    p.add_argument("--output_dir", required=True, type=Path, help="merged model folder to write (replaced atomically)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max abs logit difference allowed between merged and base+adapter in float32 (default 1e-4)")
    p.add_argument("--save_dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the written weights (default auto: the base checkpoint's dtype)")
    a = p.parse_args(argv)
    report = merge(MergeConfig(**vars(a)))
    print(f"merged into {a.output_dir} (max abs logit diff {report['max_abs_logit_diff']:.3g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
