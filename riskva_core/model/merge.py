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

1. load base + adapter (unmerged, sdpa attention whatever training used); on a few held-out
   samples (model/merge_gate.py) record base + adapter's greedy answer and logits, the base's
   (adapter off), and both computed one float wider, module by module: bf16's own noise at this
   model's depth, and the adapter's effect in the reference precision;
2. merge each LoRA layer in place (peft's ``LoraLayer.merge``, one layer at a time, into the
   loaded weight itself), recording how much of its update ``B·A·scale`` survived the cast
   (``layers.<name>.kept``); layers that kept less than half are a WARNING in
   ``merge_report.json``, not a refusal (``--max_update_error`` makes them one again);
3. save (from the weights' own memory), free, reload the SAVED folder with plain transformers
   (no peft) and run it on the same inputs. The verdict (``verdict`` in the report):
   ``equivalent`` when its logits are within the tolerance of base + adapter's (``NOISE_FACTOR``
   x that noise at each position's own scale), its greedy answer the same, and the adapter's
   effect clearly larger than the tolerance; ``unverifiable`` when all that holds but the effect
   is not clearly larger (a merge that lost it would pass too): saved, with a warning, and
   evaluation is the judge. A merged model that answers like the base where base + adapter does
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
from riskva_core.model.merge_gate import (  # noqa: F401 (fixed_inputs, fixed_image, computed_in: re-exported)
    ANSWER_TOKENS, GATE_ATTENTION, NOISE_FACTOR, PROBE_SAMPLES, Probe, computed_in, fixed_image, fixed_inputs, judge,
    probe_images, reference_logits, wider,
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
        if self.attn_implementation not in ("auto",) + GATE_ATTENTION:
            raise RiskvaError(f"--attn_implementation {self.attn_implementation}: the merge gate runs with sdpa or "
                              "eager only (flash-attn computes attention in bf16 even in the gate's fp32 reference "
                              "pass, hiding bf16's noise); auto picks sdpa")
        if self.save_dtype is not None:
            self.torch_dtype = self.save_dtype
        resolve_dtype(self.torch_dtype, "cpu")  # refuses float16 and unknown names before any loading
        # Resolved last: a hub id is looked up in the cache, an MLflow URI downloaded.
        self.base_dir = resolve_model_ref(self.base_model_path, "--base_model_path")
        if self.output_dir.resolve() in (self.base_dir.resolve(), self.adapter_path.resolve()):
            raise RiskvaError("--output_dir must differ from the base model and adapter folders")

    def gate_attention(self) -> str:
        """sdpa unless eager is asked for: never flash_attention_2, whatever training used."""
        return "sdpa" if self.attn_implementation == "auto" else self.attn_implementation

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

    In place (``safe_merge=False``: ``W += B·A·scale``, computed in fp32 and rounded once), so the
    merged weight takes the place of the loaded one: a base loaded from a memory-mapped
    safetensors file turns each page private as it is written, and the model never exists twice
    (peft's safe merge builds a new weight and leaves the mapped one resident). Its finiteness
    check is done here instead. One layer's copy (its own dtype) and its update (fp32) are held at a
    time. ``kept`` = 1 - |applied - update| / |update|.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    layers: dict[str, dict] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        short = name.removeprefix("base_model.model.")
        for adapter in [a for a in module.active_adapters if a in module.lora_A]:
            weight = module.get_base_layer().weight
            with torch.no_grad():
                before = weight.detach().clone()
                module.merge(safe_merge=False, adapter_names=[adapter])
                if not bool(torch.isfinite(weight).all()):
                    raise RiskvaError(f"merge refused: layer {short} is not finite once merged (the adapter is "
                                      "broken); nothing written", exit_code=3)
                # The same B·A·scale again, once peft's own copy is freed: never two fp32 updates at once.
                update = module.get_delta_weight(adapter).detach().to(torch.float32, copy=True)
                norm = float(update.norm())
                err = update.sub_(weight).add_(before)  # update - applied, in the update's memory
                rel = float(err.norm()) / norm if norm > 0 else 0.0
                changed = float((weight != before).float().mean())
                weight_norm = float(torch.linalg.vector_norm(before, dtype=torch.float32))
            layers[short] = {"update_norm": norm, "weight_norm": weight_norm,
                             "kept": max(0.0, 1.0 - rel) if norm > 0 else None, "changed_fraction": changed}
            del before, update, err
    return layers


def unwrap_merged(model):
    """The plain transformers model once every LoRA layer is merged in place: LoRA wrappers dropped,
    and each ``modules_to_save`` wrapper (the trained lm_head, merger) replaced by the adapter's
    TRAINED copy. That is peft's ``merge_and_unload``; its merge step finds every layer already
    merged and does nothing. Not ``unload()``: since peft 0.22 it puts the ORIGINAL module back in
    place of a ``modules_to_save`` copy, which silently drops a trained head from the merge."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All adapters are already merged, nothing to do.")
        return model.merge_and_unload()


def _below(layers: dict[str, dict], kept: float) -> list[str]:
    return [k for k, v in layers.items() if v["kept"] is not None and v["kept"] < kept]


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" …" if len(names) > 5 else "")


def _figures(verdict: dict, report: dict) -> str:
    """The gate's numbers in words: the worst logit against its tolerance, and the greedy answers."""
    name, tol = report["dtype"], verdict["worst_tolerance_abs"]
    basis = (f"{NOISE_FACTOR:g} x the base's own {name}-vs-{report['noise_reference']} difference, "
             f"{verdict['noise_relative']:.3g} of its logit scale, at base+adapter's scale there"
             if verdict["noise_factor"] else "--tolerance")
    decisive, samples = verdict["answers_decisive"], report["verify_input"]["samples"]
    answers = (f"greedy answers agree at {verdict['answers_agree']} of {verdict['answer_positions']} answer tokens "
               f"({samples} sample{'s' if samples > 1 else ''} x up to {report['verify_input']['answer_tokens_max']})")
    if verdict["verdict"] in ("equivalent", "unverifiable") and decisive:
        answers += (f", none differs at the {decisive} decisive ones (a rate above "
                    f"{verdict['answer_disagreement_bound_95']:.1%} would have shown, 95 %)")
    return (f"logits differ by {verdict['worst_abs_logit_diff']:.3g} where the tolerance is {tol:.3g} "
            f"({verdict['logit_diff_ratio']:.2f} of it at the closest logit; tolerance {basis}); {answers}")


def _effect(verdict: dict) -> str:
    return (f"base+adapter differs from the model without its LoRA updates by {verdict['adapter_effect_ratio']:.3g} "
            f"tolerances at most ({verdict['adapter_effect_abs_logit_diff']:.3g} in logits, computed in the reference "
            "precision)")


def _gate_error(verdict: dict, report: dict, what: str) -> RiskvaError:
    name, figures = report["dtype"], _figures(verdict, report)
    if verdict["verdict"] == "lost":
        weak = _below(report["layers"], SURVIVAL_WARNING)
        changed, lost = verdict["adapter_changed_answers"], verdict["answers_lost_to_base"]
        evidence = (f"at {lost} of the {changed} answer tokens the adapter changes, {what} gives the LoRA-less model's"
                    if lost else f"where it fails, {what} lies closer to the LoRA-less model than to base+adapter "
                    f"(at the worst logit's position {verdict['worst_position_to_base_ratio']:.2f} vs "
                    f"{verdict['logit_diff_ratio']:.2f} tolerances; no greedy answer token of theirs differs clearly)")
        return RiskvaError(
            f"merge refused: the adapter's effect is lost in {name}: {evidence}; {_effect(verdict)}; {figures}; the "
            f"LoRA update rounded away in {len(weak)} of {len(report['layers'])} layers; train longer or at a LoRA "
            "learning rate, or merge with --torch_dtype float32; nothing written", exit_code=3)
    return RiskvaError(f"merge verification failed: {what} and base+adapter disagree ({figures}); nothing written",
                       exit_code=3)


def verdict_line(verdict: dict, report: dict) -> str:
    """The report's one-line account of the verdict (merge_report.json ``verdict_reason``)."""
    if verdict["verdict"] == "unverifiable":
        return (f"unverifiable: {_effect(verdict)}, not more than {verdict['verifiable_factor']:g}, so a merge that "
                f"lost it would pass this gate too; the merged model is within the tolerance "
                f"({_figures(verdict, report)}); evaluation is the judge of this version")
    return (f"equivalent: {_figures(verdict, report)}; {_effect(verdict)}, more than "
            f"{verdict['verifiable_factor']:g}, so a merge that lost it would have been refused")


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
        return load_model(path, adapter, dtype=dtype, attn_implementation=cfg.gate_attention(),
                          device=device, flag="--base_model_path").to(device).eval()

    # 1. One copy: base + adapter, then the base alone (adapter off), each also one float wider.
    model = load(cfg.base_dir, cfg.adapter_path)
    images, probe_source = probe_images(sources, cfg.probe_samples)
    probe = Probe(model, processor, template, images, device, cfg.answer_tokens)
    passes = reference_logits(model, probe, dtype)
    # 2. Merge in place, layer by layer.
    layers = merge_layers(model)
    weak = _below(layers, SURVIVAL_WARNING)
    report: dict[str, Any] = {
        "base_model_path": cfg.base_model_path,
        "adapter_path": str(cfg.adapter_path),
        "adapter_sha256": _sha256(cfg.adapter_path / "adapter_model.safetensors"),
        "dtype": name,
        "device": device.type,
        "attn_implementation": cfg.gate_attention(),
        "noise_reference": dtype_name(wider(dtype)),
        "verify_input": {"images": probe_source, "samples": len(probe.batches), "prompt_tokens": probe.prompt_tokens,
                         "answer_tokens": probe.answer_tokens, "answer_tokens_max": cfg.answer_tokens},
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
    merged_model = unwrap_merged(model)
    del model

    with atomic_dir(cfg.output_dir) as tmp:  # removed unless the whole block succeeds: nothing written
        # save_pretrained writes each tensor from its own memory (safetensors serializes from the
        # tensors' pointers): no state-dict copy of the model.
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
        merged_logits = probe.logits(reloaded)
        del reloaded
        gc.collect()  # the judgement's working tensors take its place, not come on top
        verdict = judge(passes, merged_logits, dtype, cfg.tolerance)
        report.update(verdict)
        if verdict["verdict"] not in ("equivalent", "unverifiable"):
            raise _gate_error(verdict, report, "the merged model")
        report["verdict_reason"] = verdict_line(verdict, report)
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
    p.add_argument("--attn_implementation", default="auto", choices=["auto", "sdpa", "eager"],
                   help="attention kernel of the gate's passes: sdpa (auto) or eager, never flash_attention_2 "
                   "(it computes in bf16 even in the fp32 reference pass); the merged weights are the same")
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
    for warning in report["warnings"] + ([report["verdict_reason"]] if report["verdict"] != "equivalent" else []):
        print(f"warning: {warning}", file=sys.stderr)
    kept = "-" if report["min_kept"] is None else f"{report['min_kept']:.3g}"
    print(f"merged into {a.output_dir} ({report['dtype']}; verdict {report['verdict']}; worst logit "
          f"{report['logit_diff_ratio']:.2f} of its tolerance; adapter effect {report['adapter_effect_ratio']:.3g} "
          f"tolerances; greedy answers agree at {report['answers_agree']} of {report['answer_positions']} tokens; "
          f"smallest share of a layer's LoRA update kept {kept})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
