"""Load a Qwen2.5-VL processor and model from a local folder, the same way for every step.

Training, merging, inference and serving all call these two functions, so a tiny local
model and ``Qwen/Qwen2.5-VL-7B-Instruct`` go through one code path. Nothing is fetched
from the hub (``local_files_only``) and no repository code runs (``trust_remote_code=False``);
weights load from safetensors only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from riskva_core.errors import RiskvaError

ADAPTER_CONFIG = "adapter_config.json"


def _resolve(path: str | os.PathLike, flag: str) -> str:
    p = Path(path)
    if p.is_dir():
        return str(p)
    # A hub id is accepted only if it is already in the local cache (local_files_only below).
    if p.exists() or str(path).startswith((".", "/")) or str(path).count("/") != 1:
        raise RiskvaError(f"{flag} {path}: no such model folder")
    return str(path)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_processor(path: str | os.PathLike, min_pixels: int | None = None, max_pixels: int | None = None):
    """The processor saved at ``path`` (a model or adapter folder), optionally re-budgeted.

    A pixel budget given here replaces both ``min_pixels``/``max_pixels`` and ``size`` of the
    image processor, so that saving this processor records exactly the resize policy used.
    """
    from transformers import AutoProcessor

    src = _resolve(path, "--model_name_or_path")
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


def _dtype(dtype: Any):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return "auto"
    if dtype not in names:
        raise RiskvaError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def load_model(path: str | os.PathLike, adapter_path: str | os.PathLike | None = None, dtype: Any = None,
               trainable_adapter: bool = False):
    """The base model at ``path``, with the PEFT adapter at ``adapter_path`` applied if given.

    ``dtype`` None keeps float32 (CPU training and exact merge checks); "auto" uses the
    checkpoint's dtype. The adapter stays unmerged (a ``PeftModel``); see merge.py to fold it.
    """
    from transformers import AutoModelForImageTextToText

    src = _resolve(path, "--model_name_or_path")
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            src,
            dtype=_dtype(dtype) or _dtype("float32"),
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
        )
    except (OSError, ValueError) as exc:
        raise RiskvaError(f"{path}: cannot load model ({str(exc).splitlines()[0]})") from None
    if adapter_path is not None:
        from peft import PeftModel

        if not is_adapter_dir(adapter_path):
            raise RiskvaError(f"--adapter_path {adapter_path}: no {ADAPTER_CONFIG}")
        model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=trainable_adapter)
    return model
