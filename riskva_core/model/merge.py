"""Fold a LoRA adapter into its base model, verified, as a standalone safetensors model folder.

    riskva merge --base_model_path MODEL --adapter_path OUT/adapter --output_dir MERGED

MODEL is a folder, a hub id (``Qwen/Qwen2.5-VL-7B-Instruct``, from the Hugging Face cache) or
an MLflow model URI. The merge runs in ONE copy of the model, in the dtype it is saved in
(``--torch_dtype``, default auto: the base checkpoint's dtype, bf16 for the 7B), on the GPU when
there is one: a 7B never exists as two fp32 copies. Each LoRA layer is merged by peft
(``LoraLayer.merge``) one at a time, and how much of its update ``B·A·scale`` survived the
rounding into the saved dtype is measured and written to ``merge_report.json``
(``layers.<name>.kept`` = 1 - |applied - update| / |update|). A layer whose update rounded away
(kept below ``1 - --max_update_error``, default 0.5: e.g. an update far below bf16's resolution
of the weights, as a LoRA trained at a full fine-tuning learning rate produces) fails the merge
with the layers named, exit code 3, nothing written.

The SAVED folder is then reloaded with plain transformers (no peft) in that dtype and run on a
fixed input (a drawn image + the training prompt); its logits must match base + adapter
(unmerged, computed before the merge in the same dtype) within ``--tolerance``: by default 1e-4
absolute in float32 and 3% of the largest logit in bfloat16 (bf16 keeps 8 significant bits,
0.4% per rounding, and a forward pass compounds roundings). Otherwise exit code 3, nothing
written. The output holds the weights, the adapter's processor (so the training pixel policy
carries over), prompt_template.json, the training records (training_args.json, dataset.json,
metrics.json when present) and merge_report.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from riskva_core.atomic import atomic_dir, write_json
from riskva_core.data.conversation import PromptTemplate
from riskva_core.errors import RiskvaError
from riskva_core.model.loading import (
    dtype_name, is_adapter_dir, load_model, load_processor, resolve_dtype, save_processor,
)
from riskva_core.model.resolve import resolve_model_ref

CARRIED_FILES = ("prompt_template.json", "image_policy.json", "training_args.json", "dataset.json", "metrics.json")
# Default --tolerance per dtype: absolute in float32, relative to the largest |logit| in bfloat16.
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


@dataclasses.dataclass
class MergeConfig:
    base_model_path: str | Path
    adapter_path: Path
    output_dir: Path
    tolerance: float | None = None  # None: DEFAULT_TOLERANCE for the merge dtype
    torch_dtype: str = "auto"  # "auto": the base checkpoint's dtype
    save_dtype: str | None = None  # older spelling of torch_dtype
    attn_implementation: str = "auto"
    device: str = "auto"
    max_update_error: float = 0.5

    def __post_init__(self) -> None:
        self.base_model_path = str(self.base_model_path)
        self.adapter_path = Path(self.adapter_path)
        self.output_dir = Path(self.output_dir)
        if not is_adapter_dir(self.adapter_path):
            raise RiskvaError(f"--adapter_path {self.adapter_path}: no adapter_config.json (not a PEFT adapter)")
        if self.tolerance is not None and not self.tolerance > 0:
            raise RiskvaError(f"--tolerance must be positive, got {self.tolerance}")
        if not 0 < self.max_update_error <= 1:
            raise RiskvaError(f"--max_update_error must be in (0, 1], got {self.max_update_error}")
        if self.save_dtype is not None:
            self.torch_dtype = self.save_dtype
        resolve_dtype(self.torch_dtype, "cpu")  # refuses float16 and unknown names before any loading
        # Resolved last: a hub id is looked up in the cache, an MLflow URI downloaded.
        self.base_dir = resolve_model_ref(self.base_model_path, "--base_model_path")
        if self.output_dir.resolve() in (self.base_dir.resolve(), self.adapter_path.resolve()):
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


def _checkpoint_dtype(model_dir: Path) -> str:
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype") or "float32")


def merge_layers(model, max_update_error: float) -> tuple[dict[str, dict], list[str]]:
    """Merge every LoRA layer in place (peft's own merge), measuring what survived the cast.

    Only one layer's weight is held in fp32 at a time. Returns (per-layer record, layers whose
    update rounded away).
    """
    import torch
    from peft.tuners.lora import LoraLayer

    layers: dict[str, dict] = {}
    lost: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in [a for a in module.active_adapters if a in module.lora_A]:
            weight = module.get_base_layer().weight
            with torch.no_grad():
                before = weight.detach().float().clone()
                update = module.get_delta_weight(adapter).detach().float()
                module.merge(safe_merge=True, adapter_names=[adapter])
                applied = weight.detach().float() - before
                norm = float(update.norm())
                err = float((applied - update).norm()) / norm if norm > 0 else 0.0
            short = name.removeprefix("base_model.model.")
            kept = max(0.0, 1.0 - err) if norm > 0 else None
            layers[short] = {"update_norm": norm, "weight_norm": float(before.norm()),
                             "kept": kept, "changed_fraction": float((applied != 0).float().mean())}
            if norm > 0 and err > max_update_error:
                lost.append(short)
            del before, update, applied
    return layers, lost


def merge(cfg: MergeConfig) -> dict[str, Any]:
    """Merge, check what survived, save, verify the saved folder; returns the merge report."""
    import torch

    processor = load_processor(cfg.adapter_path)  # the adapter's processor carries the pixel policy
    template = _template(cfg.adapter_path)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    requested = _checkpoint_dtype(cfg.base_dir) if cfg.torch_dtype == "auto" else cfg.torch_dtype
    dtype = resolve_dtype(requested, device)
    name = dtype_name(dtype)
    tolerance = cfg.tolerance if cfg.tolerance is not None else DEFAULT_TOLERANCE[name]

    def load(path, adapter=None):
        return load_model(path, adapter, dtype=dtype, attn_implementation=cfg.attn_implementation,
                          device=device, flag="--base_model_path").to(device).eval()

    model = load(cfg.base_dir, cfg.adapter_path)
    inputs = {k: v.to(device) for k, v in fixed_inputs(processor, template).items()}
    expected = _logits(model, inputs).cpu()  # base + adapter, unmerged, in the merge dtype
    layers, lost = merge_layers(model, cfg.max_update_error)
    report: dict[str, Any] = {
        "base_model_path": cfg.base_model_path,
        "adapter_path": str(cfg.adapter_path),
        "adapter_sha256": _sha256(cfg.adapter_path / "adapter_model.safetensors"),
        "dtype": name,
        "device": device.type,
        "verify_input": {"image": "merge.fixed_image(224)", "tokens": int(inputs["input_ids"].shape[1])},
        "max_update_error": cfg.max_update_error,
        "lora_layers": len(layers),
        "min_kept": min((v["kept"] for v in layers.values() if v["kept"] is not None), default=None),
        "layers": layers,
    }
    if lost:
        raise RiskvaError(
            f"merge refused: the LoRA update of {len(lost)} of {len(layers)} layers rounded away in {name} "
            f"(kept < {1 - cfg.max_update_error:g}): {', '.join(lost[:5])}{' …' if len(lost) > 5 else ''}; "
            "the adapter is too weak for this dtype (train longer or at a LoRA learning rate, or merge with "
            "--torch_dtype float32); nothing written", exit_code=3)
    merged_model = model.unload()  # weights already merged layer by layer; drops the LoRA wrappers
    del model

    with atomic_dir(cfg.output_dir) as tmp:
        merged_model.save_pretrained(tmp, safe_serialization=True)
        del merged_model
        gc.collect()  # one model in memory at a time: the merged one goes before the saved one loads
        save_processor(processor, tmp)
        for fname in CARRIED_FILES:
            if (cfg.adapter_path / fname).is_file():
                shutil.copyfile(cfg.adapter_path / fname, tmp / fname)
        # The SAVED folder, loaded with plain transformers (no peft), against base + adapter.
        reloaded = load(tmp)
        if any("lora_" in n for n, _ in reloaded.named_parameters()):
            raise RiskvaError("merged model still contains LoRA parameters")
        diff = float((_logits(reloaded, inputs).cpu() - expected).abs().max())
        del reloaded
        scale = 1.0 if name == "float32" else max(1.0, float(expected.abs().max()))
        report.update({"max_abs_logit_diff": diff, "logit_scale": scale, "tolerance": tolerance,
                       "tolerance_abs": tolerance * scale, "equivalent": diff <= tolerance * scale})
        if not diff <= tolerance * scale:
            raise RiskvaError(
                f"merge verification failed: the saved model and base+adapter logits differ by {diff:.3g} "
                f"(tolerance {tolerance:g} x {scale:.3g} in {name}); nothing written", exit_code=3)
        write_json(tmp / "merge_report.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="riskva merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model_path", required=True,
                   help="the base model the adapter was trained on: a folder, a hub id or an MLflow URI")
    p.add_argument("--adapter_path", required=True, type=Path, help="the PEFT adapter folder (OUT/adapter of riskva train)")
    p.add_argument("--output_dir", required=True, type=Path, help="merged model folder to write (replaced atomically)")
    p.add_argument("--torch_dtype", default="auto",
                   help="merge and save dtype: auto (the base checkpoint's), bfloat16 or float32; float16 is refused")
    p.add_argument("--save_dtype", default=None, help=argparse.SUPPRESS)  # older spelling of --torch_dtype
    p.add_argument("--attn_implementation", default="auto", choices=["auto", "sdpa", "flash_attention_2", "eager"],
                   help="attention kernel for the verification passes (default auto)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: the GPU if there is one)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="allowed saved-vs-base+adapter logit difference (default 1e-4 absolute in float32, "
                   "0.03 x the largest |logit| in bfloat16)")
    p.add_argument("--max_update_error", type=float, default=0.5,
                   help="refuse the merge when a layer's applied update differs from B·A·scale by more than "
                   "this fraction of it (default 0.5: less than half survived the cast)")
    a = p.parse_args(argv)
    report = merge(MergeConfig(**vars(a)))
    print(f"merged into {a.output_dir} ({report['dtype']}; max abs logit diff {report['max_abs_logit_diff']:.3g}; "
          f"smallest LoRA update kept {report['min_kept']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
