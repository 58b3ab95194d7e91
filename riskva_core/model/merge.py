"""Fold a LoRA adapter into its base model, judged by what the merged model does, as a
standalone safetensors model folder.

    riskva merge --base_model_path MODEL --adapter_path RUN/adapter --output_dir MERGED
    riskva merge --base_model_path MODEL --adapter_path RUN/checkpoint-200 --output_dir MERGED

MODEL is a folder, a hub id (``Qwen/Qwen2.5-VL-7B-Instruct``, from the Hugging Face cache) or
an MLflow model URI. ``--adapter_path`` is a run's ``adapter/`` or any of its ``checkpoint-N/``
(the processor, image policy and prompt template come from the checkpoint, else from the run's
``adapter/``). The merge runs in ONE copy of the model, in the dtype it is saved in
(``--torch_dtype``, default auto: the base checkpoint's dtype, bf16 for the 7B), on the GPU when
there is one. In order, never two copies of the model and never a whole fp32 one:

1. load base + adapter (unmerged); on a few held-out samples (model/merge_gate.py) record base +
   adapter's greedy answer and logits, the base's (adapter off), and the base's computed one
   float wider, module by module: bf16's own noise at this model's depth;
2. merge each LoRA layer in place (peft's ``LoraLayer.merge``, one layer at a time), recording
   how much of its update ``B·A·scale`` survived the cast (``layers.<name>.kept``); layers that
   kept less than half are a WARNING in ``merge_report.json``, not a refusal (``--max_update_error``
   makes them one again);
3. save, free, reload the SAVED folder with plain transformers (no peft) and run it on the same
   inputs: its logits must be within ``NOISE_FACTOR`` x that noise of base + adapter's and its
   greedy answer the same. A merged model that answers like the base where base + adapter does
   not (the adapter's effect lost in the cast) is refused, as is any other disagreement: exit
   code 3, one line, nothing written (the folder is swapped in only when all of this passed).

The output holds the weights, the adapter's processor (so the training pixel policy carries over),
image_policy.json, prompt_template.json, the training records (training_args.json, dataset.json,
metrics.json when present) and merge_report.json (gate figures, per-layer survival, peak RSS).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import resource
import shutil
import sys
from pathlib import Path
from typing import Any

from riskva_core.atomic import atomic_dir, write_json
from riskva_core.data.conversation import PromptTemplate
from riskva_core.errors import RiskvaError
from riskva_core.model.loading import checkpoint_dtype, dtype_name, is_adapter_dir, load_model, load_processor, resolve_dtype, save_processor
from riskva_core.model.merge_gate import (  # noqa: F401 (fixed_inputs, fixed_image: re-exported)
    ANSWER_TOKENS, NOISE_FACTOR, PROBE_SAMPLES, Probe, computed_in, fixed_image, fixed_inputs, judge, probe_images,
    wider,
)
from riskva_core.model.resolve import resolve_model_ref

CARRIED_FILES = ("prompt_template.json", "image_policy.json", "training_args.json", "dataset.json", "metrics.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
SURVIVAL_WARNING = 0.5  # a layer that kept less than this share of its update is named in the report


@dataclasses.dataclass
class MergeConfig:
    base_model_path: str | Path
    adapter_path: Path
    output_dir: Path
    tolerance: float | None = None  # None: measured (NOISE_FACTOR x bf16's own noise on the probe)
    torch_dtype: str = "auto"  # "auto": the base checkpoint's dtype
    save_dtype: str | None = None  # older spelling of torch_dtype
    attn_implementation: str = "auto"
    device: str = "auto"
    max_update_error: float | None = None  # None: per-layer survival is reported, the outputs decide
    probe_samples: int = PROBE_SAMPLES
    answer_tokens: int = ANSWER_TOKENS

    def __post_init__(self) -> None:
        self.base_model_path = str(self.base_model_path)
        self.adapter_path = Path(self.adapter_path)
        self.output_dir = Path(self.output_dir)
        if not is_adapter_dir(self.adapter_path):
            raise RiskvaError(f"--adapter_path {self.adapter_path}: no adapter_config.json (not a PEFT adapter)")
        if self.tolerance is not None and not self.tolerance > 0:
            raise RiskvaError(f"--tolerance must be positive, got {self.tolerance}")
        if self.max_update_error is not None and not 0 < self.max_update_error <= 1:
            raise RiskvaError(f"--max_update_error must be in (0, 1], got {self.max_update_error}")
        if self.probe_samples < 1 or self.answer_tokens < 1:
            raise RiskvaError(f"--probe_samples and --answer_tokens must be >= 1, got {self.probe_samples}, "
                              f"{self.answer_tokens}")
        if self.save_dtype is not None:
            self.torch_dtype = self.save_dtype
        resolve_dtype(self.torch_dtype, "cpu")  # refuses float16 and unknown names before any loading
        # Resolved last: a hub id is looked up in the cache, an MLflow URI downloaded.
        self.base_dir = resolve_model_ref(self.base_model_path, "--base_model_path")
        if self.output_dir.resolve() in (self.base_dir.resolve(), self.adapter_path.resolve()):
            raise RiskvaError("--output_dir must differ from the base model and adapter folders")

    @property
    def sources(self) -> list[Path]:
        """Where the processor, image policy, prompt template and records are looked up, in order:
        the adapter folder itself, then (for a ``checkpoint-N``) its run's final ``adapter/``."""
        run_adapter = self.adapter_path.parent / "adapter"
        same = run_adapter.resolve() == self.adapter_path.resolve()
        return [self.adapter_path] + ([] if same or not run_adapter.is_dir() else [run_adapter])


def _first_with(folders: list[Path], *names: str) -> Path | None:
    return next((f for f in folders if any((f / n).is_file() for n in names)), None)


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def merge_layers(model) -> dict[str, dict]:
    """Merge every LoRA layer in place (peft's own merge), measuring what survived the cast.

    Only one layer's weight is held in fp32 at a time. ``kept`` = 1 - |applied - update| / |update|.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    layers: dict[str, dict] = {}
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
            layers[name.removeprefix("base_model.model.")] = {
                "update_norm": norm, "weight_norm": float(before.norm()),
                "kept": max(0.0, 1.0 - err) if norm > 0 else None,
                "changed_fraction": float((applied != 0).float().mean())}
            del before, update, applied
    return layers


def _below(layers: dict[str, dict], kept: float) -> list[str]:
    return [k for k, v in layers.items() if v["kept"] is not None and v["kept"] < kept]


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" …" if len(names) > 5 else "")


def _gate_error(verdict: dict, report: dict, what: str) -> RiskvaError:
    name, tol = report["dtype"], verdict["tolerance_abs"]
    basis = (f"tolerance {tol:.3g} = {NOISE_FACTOR:g} x the base's own {name}-vs-{report['noise_reference']} "
             f"difference {verdict['noise_abs_logit_diff']:.3g} at logit scale {verdict['base_logit_scale']:.3g}, "
             f"taken at scale {max(verdict['logit_scale'], verdict['base_logit_scale']):.3g}"
             if verdict["noise_factor"] else f"tolerance {tol:.3g}")
    figures = (f"logits differ by {verdict['max_abs_logit_diff']:.3g} ({basis}), greedy answers agree at "
               f"{verdict['answer_agreement']:.0%} of {verdict['answer_positions']} tokens")
    if verdict["effect_lost"]:
        weak = _below(report["layers"], SURVIVAL_WARNING)
        return RiskvaError(
            f"merge refused: the adapter's effect is lost in {name}: {what} answers like the base where base+adapter "
            f"does not ({verdict['answers_lost_to_base']} of {verdict['adapter_changed_answers']} changed answer "
            f"tokens; {figures}; the LoRA update rounded away in {len(weak)} of {len(report['layers'])} layers); "
            "train longer or at a LoRA learning rate, or merge with --torch_dtype float32; nothing written",
            exit_code=3)
    return RiskvaError(f"merge verification failed: {what} and base+adapter disagree ({figures}); nothing written",
                       exit_code=3)


def merge(cfg: MergeConfig) -> dict[str, Any]:
    """Probe, merge, save, judge the saved folder; returns the merge report."""
    import torch

    sources = cfg.sources
    proc_dir = _first_with(sources, *PROCESSOR_FILES)
    if proc_dir is None:
        raise RiskvaError(f"--adapter_path {cfg.adapter_path}: no processor there"
                          f"{' nor in ' + str(sources[1]) if len(sources) > 1 else ''} (the training pixel policy "
                          "would be lost); merge the run's adapter/ or a checkpoint written by riskva train")
    processor = load_processor(proc_dir)  # the adapter's processor carries the pixel policy
    tpl_dir = _first_with(sources, "prompt_template.json")
    template = PromptTemplate.load(tpl_dir / "prompt_template.json") if tpl_dir else PromptTemplate()
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    # auto = the dtype the base is saved in (not the host's compute preference): the merged
    # folder must be the same kind of checkpoint as its base.
    requested = (checkpoint_dtype(cfg.base_dir) or "float32") if cfg.torch_dtype == "auto" else cfg.torch_dtype
    dtype = resolve_dtype(requested, device)
    name = dtype_name(dtype)

    def load(path, adapter=None):
        return load_model(path, adapter, dtype=dtype, attn_implementation=cfg.attn_implementation,
                          device=device, flag="--base_model_path").to(device).eval()

    # 1. One copy: base + adapter, then the base alone (adapter off), then the base one float wider.
    model = load(cfg.base_dir, cfg.adapter_path)
    images, probe_source = probe_images(sources, cfg.probe_samples)
    probe = Probe(model, processor, template, images, device, cfg.answer_tokens)
    ref = probe.logits(model)
    with model.disable_adapter():
        base = probe.logits(model)
        with computed_in(model, wider(dtype)):
            base_wide = probe.logits(model)
    # 2. Merge in place, layer by layer.
    layers = merge_layers(model)
    weak = _below(layers, SURVIVAL_WARNING)
    report: dict[str, Any] = {
        "base_model_path": cfg.base_model_path,
        "adapter_path": str(cfg.adapter_path),
        "adapter_sha256": _sha256(cfg.adapter_path / "adapter_model.safetensors"),
        "dtype": name,
        "device": device.type,
        "noise_reference": dtype_name(wider(dtype)),
        "verify_input": {"images": probe_source, "prompt_tokens": probe.prompt_tokens,
                         "answer_tokens": probe.answer_tokens},
        "max_update_error": cfg.max_update_error,
        "lora_layers": len(layers),
        "min_kept": min((v["kept"] for v in layers.values() if v["kept"] is not None), default=None),
        "layers": layers,
        "warnings": [f"the LoRA update of {len(weak)} of {len(layers)} layers mostly rounded away in {name} "
                     f"(kept < {SURVIVAL_WARNING:g}): {_names(weak)}; the merge is judged by its outputs"] if weak else [],
    }
    if cfg.max_update_error is not None:
        lost = _below(layers, 1 - cfg.max_update_error)
        if lost:
            raise RiskvaError(
                f"merge refused: the LoRA update of {len(lost)} of {len(layers)} layers rounded away in {name} "
                f"(kept < {1 - cfg.max_update_error:g}, --max_update_error {cfg.max_update_error:g}): {_names(lost)}; "
                "nothing written", exit_code=3)
    merged_model = model.unload()  # weights already merged layer by layer; drops the LoRA wrappers
    del model

    with atomic_dir(cfg.output_dir) as tmp:  # removed unless the whole block succeeds: nothing written
        merged_model.save_pretrained(tmp, safe_serialization=True)
        del merged_model
        gc.collect()  # one model in memory at a time: the merged one goes before the saved one loads
        save_processor(processor, tmp)
        for fname in CARRIED_FILES:
            src = _first_with(sources, fname)
            if src is not None:
                shutil.copyfile(src / fname, tmp / fname)
        # 3. What ships is judged: the SAVED folder, loaded with plain transformers (no peft).
        reloaded = load(tmp)
        if any("lora_" in n for n, _ in reloaded.named_parameters()):
            raise RiskvaError("merged model still contains LoRA parameters")
        verdict = judge(ref, base, base_wide, probe.logits(reloaded), dtype, cfg.tolerance)
        del reloaded
        report.update(verdict)
        if not verdict["equivalent"]:
            raise _gate_error(verdict, report, "the merged model")
        report["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)
        write_json(tmp / "merge_report.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="riskva merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model_path", required=True,
                   help="the base model the adapter was trained on: a folder, a hub id or an MLflow URI")
    p.add_argument("--adapter_path", required=True, type=Path,
                   help="the PEFT adapter folder: OUT/adapter of riskva train, or any OUT/checkpoint-N")
    p.add_argument("--output_dir", required=True, type=Path, help="merged model folder to write (replaced atomically)")
    p.add_argument("--torch_dtype", default="auto",
                   help="merge and save dtype: auto (the base checkpoint's), bfloat16 or float32; float16 is refused")
    p.add_argument("--save_dtype", default=None, help=argparse.SUPPRESS)  # older spelling of --torch_dtype
    p.add_argument("--attn_implementation", default="auto", choices=["auto", "sdpa", "flash_attention_2", "eager"],
                   help="attention kernel for the verification passes (default auto)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: the GPU if there is one)")
    p.add_argument("--tolerance", type=float, default=None,
                   help=f"allowed |merged - base+adapter| logit difference, absolute (default: measured, "
                   f"{NOISE_FACTOR:g} x the base model's own difference between this dtype and one float wider "
                   "on the same inputs)")
    p.add_argument("--max_update_error", type=float, default=None,
                   help="also refuse when a layer's applied update differs from B·A·scale by more than this "
                   "fraction of it (default: off; such layers are a warning in merge_report.json)")
    p.add_argument("--probe_samples", type=int, default=PROBE_SAMPLES,
                   help=f"held-out samples the merge is judged on (default {PROBE_SAMPLES})")
    p.add_argument("--answer_tokens", type=int, default=ANSWER_TOKENS,
                   help=f"greedy answer tokens compared per sample (default {ANSWER_TOKENS})")
    a = p.parse_args(argv)
    report = merge(MergeConfig(**vars(a)))
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    kept = "-" if report["min_kept"] is None else f"{report['min_kept']:.3g}"
    print(f"merged into {a.output_dir} ({report['dtype']}; max abs logit diff {report['max_abs_logit_diff']:.3g}, "
          f"tolerance {report['tolerance_abs']:.3g}; greedy answers agree at {report['answer_agreement']:.0%}; "
          f"smallest share of a layer's LoRA update kept {kept})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
