"""Load a Qwen2.5-VL processor and model, the same way for every step, with one precision policy.

Training, merging, inference and serving all call these functions, so the tiny local model and
``Qwen/Qwen2.5-VL-7B-Instruct`` go through one code path. A reference is a folder or a hub id
(resolved through the Hugging Face cache by model/resolve.py); no repository code runs
(``trust_remote_code=False``) and weights load from safetensors only.

Precision policy (``--torch_dtype``, ``--attn_implementation``):

    auto       bfloat16 on a CUDA GPU with bf16 support; on a CPU, the checkpoint's own dtype when a
               checkpoint is named (``checkpoint=``: inference, merge verification, registration,
               serving) and it is bf16 and the CPU computes bf16 correctly (:func:`cpu_supports_bf16`),
               else float32. A 7B checkpoint is bf16: 15 GB loaded instead of 33 GB, which is what
               lets it load at all on a 24 GB CPU host. Training names no checkpoint: float32 on CPU.
    bfloat16   Qwen2.5-VL's released precision: half the memory of fp32 (15 GB instead of 33 GB for the 7B)
    float32    exact; the tiny demo model trains in it
    float16    refused: Qwen2.5-VL's activations exceed fp16's range (65504) and overflow to inf/NaN

    attention  sdpa (PyTorch's fused kernel) by default; flash_attention_2 when the flash-attn
               package is installed, the device is a GPU and the weights are bf16 (flash-attn has no
               fp32 kernels: flash_attention_2 with float32 is refused); eager only on request.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from riskva_core.errors import RiskvaError
from riskva_core.model.resolve import ADAPTER_CONFIG, is_adapter_dir, resolve_model_ref

__all__ = ["ADAPTER_CONFIG", "is_adapter_dir", "resolve_dtype", "checkpoint_dtype", "cpu_supports_bf16", "resolve_attn_implementation", "load_model",
           "load_processor", "set_pixel_budget", "pixel_budget", "save_processor", "DTYPE_CHOICES", "ATTN_CHOICES"]

DTYPE_CHOICES = ("auto", "bfloat16", "float32")
ATTN_CHOICES = ("auto", "sdpa", "flash_attention_2", "eager")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "float": "float32"}
FP16_REFUSED = ("float16 is refused: Qwen2.5-VL's activations exceed fp16's range (max 65504) and overflow to "
                "inf/NaN; use bfloat16 (GPU) or float32")


def _device_type(device: Any) -> str:
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def checkpoint_dtype(path: str | os.PathLike | None) -> str | None:
    """The dtype a model folder was saved in (``config.json``'s ``dtype``/``torch_dtype``, top level
    or ``text_config``), canonical (bfloat16|float32|float16); None when it names none."""
    import json

    config = Path(path) / "config.json" if path is not None else None
    if config is None or not config.is_file():
        return None
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RiskvaError(f"{config}: cannot read ({exc})") from None
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    name = cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    if not isinstance(name, str):
        return None
    name = name.removeprefix("torch.")
    return {"bf16": "bfloat16", "fp32": "float32", "float": "float32", "half": "float16", "fp16": "float16"}.get(
        name, name)


@functools.lru_cache(maxsize=None)
def cpu_supports_bf16() -> bool:
    """Whether this CPU (and this torch build) computes bfloat16 matmuls correctly.

    The test is the operation itself: a 64x64 bf16 matmul must run and agree with float32 within
    bf16's precision. Every x86-64/aarch64 build of torch 2 passes (natively with AVX512-BF16 or
    AMX, converting through float32 elsewhere: slower per FLOP, same answers); a build without
    bf16 CPU kernels raises and gets float32. On a CPU host the binding limit is memory, not speed:
    float32 doubles a bf16 checkpoint (33 GB for the 7B), so bf16 wherever it computes correctly.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 64, generator=gen), torch.randn(64, 64, generator=gen)
    try:
        got = (a.to(torch.bfloat16) @ b.to(torch.bfloat16)).float()
    except (RuntimeError, NotImplementedError):
        return False
    ref = a @ b
    return bool(torch.isfinite(got).all()) and float((got - ref).abs().max()) <= 0.05 * float(ref.abs().max())


def resolve_dtype(requested: Any = "auto", device: Any = None, checkpoint: str | os.PathLike | None = None):
    """The torch dtype for ``requested`` (auto|bfloat16|float32 or a torch dtype) on ``device``.

    ``checkpoint`` (a model folder) lets ``auto`` keep the checkpoint's own bf16 on a CPU (the policy
    in the module docstring); every load of a finished model passes it.
    """
    import torch

    if isinstance(requested, torch.dtype):
        if requested == torch.float16:
            raise RiskvaError(f"--torch_dtype {FP16_REFUSED}")
        return requested
    name = _DTYPE_ALIASES.get(str(requested or "auto"), str(requested or "auto"))
    if name in ("float16", "fp16", "half"):
        raise RiskvaError(f"--torch_dtype {FP16_REFUSED}")
    if name not in DTYPE_CHOICES:
        raise RiskvaError(f"--torch_dtype must be one of {', '.join(DTYPE_CHOICES)}, got {requested!r}")
    if name == "auto":
        if _device_type(device) == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        keep_bf16 = checkpoint_dtype(checkpoint) == "bfloat16" and cpu_supports_bf16()
        return torch.bfloat16 if keep_bf16 else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def resolve_attn_implementation(requested: str | None = "auto", device: Any = None, dtype: Any = None) -> str:
    """sdpa by default; flash_attention_2 when installed, on a GPU and in bf16/fp16; a clear error otherwise.

    flash-attn has kernels for 16-bit inputs only: in float32 it fails at the first forward (merge's
    ``--torch_dtype float32`` check would crash in it), so ``auto`` keeps sdpa there and an explicit
    flash_attention_2 with float32 is refused. ``dtype`` None means the policy's ``auto`` dtype.
    """
    import torch
    from transformers.utils import is_flash_attn_2_available

    name = requested or "auto"
    if name not in ATTN_CHOICES:
        raise RiskvaError(f"--attn_implementation must be one of {', '.join(ATTN_CHOICES)}, got {requested!r}")
    on_gpu = _device_type(device) == "cuda"
    half = resolve_dtype("auto" if dtype is None else dtype, device) in (torch.bfloat16, torch.float16)
    if name == "auto":
        return "flash_attention_2" if on_gpu and half and is_flash_attn_2_available() else "sdpa"
    if name == "flash_attention_2" and not (on_gpu and is_flash_attn_2_available()):
        raise RiskvaError("--attn_implementation flash_attention_2 needs a CUDA GPU and the flash-attn package; "
                          "use sdpa")
    if name == "flash_attention_2" and not half:
        raise RiskvaError("--attn_implementation flash_attention_2 runs in bfloat16 only (flash-attn has no "
                          "float32 kernels); use --torch_dtype bfloat16, or sdpa for float32")
    return name


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_processor(path: str | os.PathLike, min_pixels: int | None = None, max_pixels: int | None = None,
                   flag: str = "--model_name_or_path"):
    """The processor saved at ``path`` (a model or adapter folder), optionally re-budgeted.

    A pixel budget given here replaces both ``min_pixels``/``max_pixels`` and ``size`` of the
    image processor, so that saving this processor records exactly the resize policy used.
    """
    from transformers import AutoProcessor

    src = resolve_model_ref(path, flag)
    try:
        processor = AutoProcessor.from_pretrained(src, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise RiskvaError(f"{path}: cannot load processor ({str(exc).splitlines()[0]})") from None
    if min_pixels is not None or max_pixels is not None:
        set_pixel_budget(processor, min_pixels, max_pixels)
    return processor


def set_pixel_budget(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """One resize policy for train/eval/serve, set on the image and video processors' ``size``.

    (Setting ``min_pixels``/``max_pixels`` attributes too would make every call pass them as
    deprecated kwargs; ``save_processor`` writes both spellings into the saved config instead.)
    """
    for sub in (getattr(processor, "image_processor", None), getattr(processor, "video_processor", None)):
        if sub is None:
            continue
        size = sub.size
        get = size.get if isinstance(size, dict) else (lambda k, s=size: getattr(s, k, None))
        lo = min_pixels if min_pixels is not None else get("shortest_edge")
        hi = max_pixels if max_pixels is not None else get("longest_edge")
        if lo is None or hi is None or not 0 < lo <= hi:
            raise RiskvaError(f"invalid pixel budget min_pixels={lo} max_pixels={hi}")
        new = {"shortest_edge": int(lo), "longest_edge": int(hi)}
        sub.size = new if isinstance(size, dict) else type(size)(**new)


def pixel_budget(processor) -> dict[str, int]:
    size = processor.image_processor.size
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k))
    return {"min_pixels": int(get("shortest_edge")), "max_pixels": int(get("longest_edge"))}


def save_processor(processor, folder: str | os.PathLike) -> None:
    """``processor.save_pretrained`` plus the pixel budget spelled both ways in its config.

    Older loaders (and humans) read ``min_pixels``/``max_pixels``; transformers 5 reads
    ``size``; both say the same, so every consumer resizes exactly like training did.
    """
    import json

    processor.save_pretrained(folder)
    budget = pixel_budget(processor)
    for name in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        path = Path(folder) / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        sections = [data[k] for k in ("image_processor", "video_processor") if isinstance(data.get(k), dict)]
        if not sections and "size" in data:
            sections = [data]
        for sec in sections:
            sec["size"] = {"shortest_edge": budget["min_pixels"], "longest_edge": budget["max_pixels"]}
            sec["min_pixels"], sec["max_pixels"] = budget["min_pixels"], budget["max_pixels"]
        from riskva_core.atomic import write_text

        write_text(path, json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


def load_model(path: str | os.PathLike, adapter_path: str | os.PathLike | None = None, dtype: Any = "auto",
               attn_implementation: str | None = "auto", device: Any = None, trainable_adapter: bool = False,
               flag: str = "--model_name_or_path"):
    """The base model at ``path`` (folder or hub id), with the PEFT adapter at ``adapter_path`` if given.

    ``dtype``/``attn_implementation`` follow the policy above for ``device`` (None: CUDA if
    present); weights are materialised straight in that dtype (no fp32 detour). The adapter
    stays unmerged (a ``PeftModel``; its LoRA weights stay fp32 by peft's autocast); see
    merge.py to fold it. The model is left on the CPU; callers move it.
    """
    from transformers import AutoModelForImageTextToText

    src = resolve_model_ref(path, flag)
    torch_dtype = resolve_dtype(dtype, device)
    attn = resolve_attn_implementation(attn_implementation, device, torch_dtype)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            src,
            dtype=torch_dtype,
            attn_implementation=attn,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
        )
    except (OSError, ValueError) as exc:
        raise RiskvaError(f"{flag} {path}: cannot load model ({str(exc).splitlines()[0]})") from None
    if str(path) != str(src):
        # A hub id: adapters trained on it record the portable name, not this machine's cache path.
        model.config._name_or_path = model.name_or_path = str(path)
    if adapter_path is not None:
        from peft import PeftModel

        if not is_adapter_dir(adapter_path):
            raise RiskvaError(f"--adapter_path {adapter_path}: no {ADAPTER_CONFIG}")
        model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=trainable_adapter)
    return model
