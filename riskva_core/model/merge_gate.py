"""The merge gate: a merge is judged by what the merged model DOES, against bf16's own noise.

A bf16 merge cannot be bit-exact: ``round(W + B·A·scale)`` is not ``W·x + B·A·x·scale``, and
the difference grows with depth (the 28-layer 7B's merged and unmerged logits differ by ~0.4
where a one-layer stand-in's differ by ~0.01). So no fixed tolerance is right for every model.
The yardstick is measured on the model itself, on the same inputs, always with sdpa or eager
attention (flash-attn computes attention in bf16 even when every weight and input is fp32, so
under it the "wider" pass would not be wider and the noise would be underestimated):

    noise      the BASE model's own bf16-vs-fp32 difference: the same forward pass, once in the
               merge dtype and once with every module computing in the next wider float
               (``computed_in``: weights widened one module at a time, restored exactly, so a
               7B never exists in fp32). It is taken per answer position relative to that
               position's logit scale (the RMS of its logits over the vocabulary) and the largest
               share over the positions is kept: what rounding to this dtype costs at this depth.
               The adapter never enters it, so no adapter can widen its own yardstick.
    tolerance  per logit: NOISE_FACTOR x that share x the REFERENCE's (base + adapter's) own
               logit scale at the same position, plus one spacing of the dtype at that logit.
               Rounding is relative to the values computed, so the scale is the reference's
               where it is compared, position by position (an adapter that makes some logits
               large, or trains lm_head, moves only its own positions' tolerance, in proportion,
               and a single large logit barely moves an RMS). Merged and unmerged bf16 are two
               computations, each off the exact result by about that noise (√2 if independent,
               2 at worst), and the merge rounds each adapted weight once more, at most half an
               ulp — the same order as rounding one matmul output. 4 covers that with room to spare.
    effect     base + adapter vs the model a merge that lost every LoRA update would be (the base
               with the adapter's full copies, ``modules_to_save``, which a merge cannot round
               away), both computed one float wider: the adapter's effect in the reference
               precision, as a multiple of the tolerance.

The probe: ``PROBE_SAMPLES`` (2) held-out samples (the prepared dataset's test, else val split,
named in the adapter's dataset.json; else a fixed drawn image) with the training prompt; base +
adapter answers each greedily (``ANSWER_TOKENS`` = 64 tokens), and every model is then run
teacher-forced on prompt + that answer, keeping only the answer positions' logits
(``logits_to_keep``): up to 128 positions. A merged answer may differ only at a near tie of
base + adapter's; at its decisive positions (first choice ahead of the second by more than both
tolerances) none may. With no disagreement at d decisive positions, a per-token rate of them
above 1 - 0.05^(1/d) would have shown at least once with 95 % probability: 2.3 % at all 128,
where 16 tokens per sample (the former default, 32 positions) bounded it only at 9 %. The report
gives d, the bound, and the agreement over all positions.

Verdict (``judge``), in order:

    lost          the merged model answers like the LoRA-less model where base + adapter clearly
                  does not (beyond both logits' tolerances), or fails the logits check at positions
                  that all lie closer to the LoRA-less model than to base + adapter: refused.
    disagree      the merged logits exceed the tolerance, or its greedy answer differs where base
                  + adapter has no near tie: refused.
    unverifiable  within the tolerance, but the adapter's effect is at most VERIFIABLE_FACTOR x
                  the tolerance: a merge that lost it would pass as well, so the gate cannot tell.
                  The merged model is saved; evaluation is the judge.
    equivalent    within the tolerance and the effect more than VERIFIABLE_FACTOR x it.

VERIFIABLE_FACTOR = 2: a merge that lost the whole effect E would lie at least E − 2·noise from
base + adapter (each of the two bf16 passes off the exact one by the noise), and with E > 2 x
tolerance = 8·noise that is 6·noise, 1.5 x the tolerance: refused with half a tolerance to spare
for the noise estimate's own scatter (the largest of a few hundred positions, measured on the
base rather than on base + adapter). At 1 x, a lost effect would sit right at the tolerance and
pass or fail by chance — as the issue measured on the 2-layer stand-in.
"""
from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, ImageDraw

from riskva_core.data.conversation import PromptTemplate

NOISE_FACTOR = 4.0
VERIFIABLE_FACTOR = 2.0  # the adapter's effect must exceed this many tolerances (module docstring)
PROBE_SAMPLES = 2
ANSWER_TOKENS = 64
GATE_ATTENTION = ("sdpa", "eager")  # kernels that compute in the dtype they are given (module docstring)
PROBE_SPLITS = ("test", "val")  # held out from training, in this order


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


def fixed_inputs(processor, template: PromptTemplate, image: Image.Image | None = None) -> dict[str, Any]:
    text = processor.apply_chat_template(template.messages(None), tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text], images=[image if image is not None else fixed_image()], return_tensors="pt"))


def _dataset_path(*folders: Path) -> Path | None:
    """The prepared dataset the adapter was trained on, from its dataset.json / training_args.json."""
    for folder in folders:
        for name, keys in (("dataset.json", ("dataset_path",)), ("training_args.json", ("data", "dataset_path"))):
            try:
                value: Any = json.loads((folder / name).read_text(encoding="utf-8"))
                for k in keys:
                    value = value[k]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if value and Path(value).exists():
                return Path(value)
    return None


def probe_images(folders: list[Path], n: int = PROBE_SAMPLES) -> tuple[list[Image.Image], str]:
    """(up to ``n`` held-out images through the model's image policy, where they came from)."""
    from riskva_core.data.image_policy import ImagePolicy
    from riskva_core.data.samples import iter_samples
    from riskva_core.errors import RiskvaError

    dataset = _dataset_path(*folders)
    if dataset is not None and dataset.is_dir():
        policy = ImagePolicy.load(*folders)
        for split in PROBE_SPLITS:
            try:
                samples = list(itertools.islice(iter_samples(dataset, split), n))
                images = [policy.apply(s.image_data(), s.id) for s in samples]
            except RiskvaError:  # split absent or unreadable: try the next, else the drawn image
                continue
            if images:
                return images, f"{dataset} split {split}, first {len(images)}"
    return [fixed_image()], "merge_gate.fixed_image(224)"


WIDE_CHUNK_BYTES = 256 << 20  # a linear layer larger than this (the 7B's lm_head: 2.2 GB in fp32) is widened in row blocks


@contextlib.contextmanager
def computed_in(model, dtype) -> Iterator[None]:
    """Every module with parameters of its own computes in ``dtype`` while the block runs.

    Its parameters are widened just before its forward and put back just after (bf16 → fp32 →
    bf16 is exact), and its floating inputs are widened, so activations flow in ``dtype`` from
    the embedding on. Only one module's widened weights exist at a time; an embedding is not
    widened at all (a lookup does not round, its output is widened instead), and a linear layer
    over WIDE_CHUNK_BYTES is computed a block of output rows at a time.
    """
    import torch
    import torch.nn.functional as F

    def widen(x):
        return x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x

    def blockwise(module):
        w, b = module.weight, module.bias
        rows = max(1, WIDE_CHUNK_BYTES // (w.shape[1] * torch.finfo(dtype).bits // 8))

        def forward(x):
            x = widen(x)
            out = [F.linear(x, w[i:i + rows].to(dtype), None if b is None else b[i:i + rows].to(dtype))
                   for i in range(0, w.shape[0], rows)]
            return torch.cat(out, dim=-1)
        return forward

    saved: dict[int, dict[str, torch.Tensor]] = {}

    def pre(module, args, kwargs):
        if not isinstance(module, torch.nn.Embedding):
            saved[id(module)] = {}
            for name, p in module.named_parameters(recurse=False):
                saved[id(module)][name] = p.data
                p.data = p.data.to(dtype)
        return tuple(widen(a) for a in args), {k: widen(v) for k, v in kwargs.items()}

    def post(module, args, output):
        for name, data in saved.pop(id(module), {}).items():
            getattr(module, name).data = data
        return widen(output) if torch.is_tensor(output) else output

    handles, patched = [], []
    for m in model.modules():
        if next(m.parameters(recurse=False), None) is None:
            continue
        if isinstance(m, torch.nn.Linear) and m.weight.numel() * torch.finfo(dtype).bits // 8 > WIDE_CHUNK_BYTES:
            m.forward = blockwise(m)  # an instance attribute: removed below, the class's forward returns
            patched.append(m)
        else:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in patched:
            del m.forward


def wider(dtype):
    import torch

    return torch.float64 if dtype == torch.float32 else torch.float32


class Probe:
    """The probe inputs: prompt + base+adapter's greedy answer, per image."""

    def __init__(self, model, processor, template: PromptTemplate, images: list[Image.Image], device,
                 answer_tokens: int = ANSWER_TOKENS):
        import torch

        from riskva_core.errors import RiskvaError

        self.batches: list[tuple[dict, int]] = []
        pad = processor.tokenizer.pad_token_id
        for image in images:
            enc = {k: v.to(device) for k, v in fixed_inputs(processor, template, image).items()}
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=answer_tokens, do_sample=False, num_beams=1,
                                     temperature=None, top_p=None, top_k=None, pad_token_id=pad)
            n_new = out.shape[1] - enc["input_ids"].shape[1]
            if n_new < 1:
                continue
            full = dict(enc, input_ids=out, attention_mask=torch.ones_like(out))
            for k, v in enc.items():  # per-token side inputs (mm_token_type_ids): answer tokens are text, 0
                if k not in ("input_ids", "attention_mask") and v.dim() == 2 and v.shape == enc["input_ids"].shape:
                    full[k] = torch.cat([v, v.new_zeros((1, n_new))], dim=1)
            self.batches.append((full, n_new))
        if not self.batches:
            raise RiskvaError("merge probe: base+adapter answered nothing on the probe images")
        self.prompt_tokens = [int(b["input_ids"].shape[1] - n) for b, n in self.batches]
        self.answer_tokens = [n for _, n in self.batches]

    def logits(self, model):
        """Logits at the answer positions as computed (a bf16 model's are bf16: kept so, exactly,
        at half an fp32 copy's memory), all probes concatenated: [positions, vocab]."""
        import torch

        rows = []
        with torch.no_grad():
            for batch, n_new in self.batches:
                # Position i predicts token i+1: the n_new positions before the last predict the answer.
                out = model(**batch, logits_to_keep=n_new + 1).logits[0, :-1]
                rows.append(out.cpu())
        return torch.cat(rows)


@contextlib.contextmanager
def lora_off(model) -> Iterator[None]:
    """Only the LoRA layers off: the model a merge that rounded every update away would leave
    (the adapter's full copies, ``modules_to_save``, are copied by a merge, never rounded away)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.disable_adapters]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def reference_logits(model, probe: Probe, dtype) -> dict[str, Any]:
    """What the gate keeps from one unmerged PeftModel (module docstring): ``ref`` base + adapter's
    logits and ``off`` the LoRA-less model's (both as computed, in ``dtype``), ``effect`` =
    |ref − off| both computed one float wider, and the base's noise figures. Only these stay in
    memory while the model is merged and saved: [positions, vocab] each, 78 MB in fp32 at 128
    positions of the 7B's vocabulary, so the wide passes are reduced as soon as they exist."""
    from peft.utils import ModulesToSaveWrapper

    wide = wider(dtype)
    ref = probe.logits(model)
    with computed_in(model, wide):
        ref_wide = probe.logits(model)
    with model.disable_adapter():
        base = probe.logits(model)
        with computed_in(model, wide):
            base_wide = probe.logits(model)
    off, off_wide = base, base_wide
    if any(isinstance(m, ModulesToSaveWrapper) for m in model.modules()):
        with lora_off(model):
            off = probe.logits(model)
            with computed_in(model, wide):
                off_wide = probe.logits(model)
    return gate_passes(ref, ref_wide, base, base_wide, off, off_wide)


def gate_passes(ref, ref_wide, base, base_wide, off=None, off_wide=None) -> dict[str, Any]:
    """reference_logits' reduction of the six passes (``off`` defaults to ``base``). ``ref_wide``
    is consumed: the effect is computed in its memory."""
    off, off_wide = (base, base_wide) if off is None else (off, off_wide)
    noise = (base.float() - base_wide).abs()
    figures = {"noise_relative": float((noise / _rms(base_wide)).max()), "noise_abs": float(noise.max()),
               "base_scale": float(_rms(base_wide).max())}
    del noise
    effect = ref_wide.sub_(off_wide).abs_()  # in place: the wide base + adapter pass is not kept
    return {"ref": ref, "off": off, "effect": effect, **figures}


def _rms(x):
    """Each position's logit scale: the RMS over the vocabulary, [positions, 1] (never 0)."""
    import torch

    return x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(torch.finfo(torch.float32).tiny)


def judge(passes: dict[str, Any], merged, dtype, tolerance: float | None = None) -> dict[str, Any]:
    """The gate's figures and verdict (see the module docstring). ``passes``: reference_logits';
    ``merged``: the merged model's logits; all [positions, vocab], compared in float32 (or
    wider). ``tolerance``: an absolute one for every logit instead of the measured one."""
    import torch

    ref, off, effect, merged = passes["ref"].float(), passes["off"].float(), passes["effect"], merged.float()
    rel_noise = passes["noise_relative"]
    if tolerance is None:  # per logit: the reference's own scale at its position, and its own spacing
        tol = ref.abs().mul_(torch.finfo(dtype).eps).add_(NOISE_FACTOR * rel_noise * _rms(ref))
    else:
        tol = torch.full_like(ref, float(tolerance))
    diff = (merged - ref).abs_()
    ratio = diff / tol
    worst = int(ratio.argmax())  # flat index: the logit closest to failing
    diff_pos = ratio.amax(-1)  # per position, in tolerances
    effect_ratio = float((effect / tol).max())
    del ratio
    to_base = (merged - off).abs_()
    off_pos = (to_base / tol).amax(-1)
    diff_ratio, to_off_ratio = float(diff_pos.max()), float(off_pos.max())
    failing = diff_pos > 1
    t_ref, t_off, t_m = ref.argmax(-1), off.argmax(-1), merged.argmax(-1)

    def at(x, t):
        return x.gather(-1, t[:, None])[:, 0]

    def clearly(a, b):  # base + adapter prefers token a over b by more than both logits' tolerances
        return at(ref, a) - at(ref, b) > at(tol, a) + at(tol, b)

    changed = (t_ref != t_off) & clearly(t_ref, t_off)  # where the LoRA layers clearly change the answer
    lost_tokens = changed & (t_m == t_off)
    disagree = (t_m != t_ref) & clearly(t_ref, t_m)
    # Or every position that fails lies closer to the LoRA-less model than to base + adapter.
    lost = bool(lost_tokens.any()) or bool(failing.any() and (off_pos[failing] < diff_pos[failing]).all())
    if lost:
        verdict = "lost"
    elif diff_ratio > 1 or bool(disagree.any()):
        verdict = "disagree"
    else:
        verdict = "equivalent" if effect_ratio > VERIFIABLE_FACTOR else "unverifiable"
    n = int(t_ref.numel())
    agree = int((t_m == t_ref).sum())
    # Decisive positions: base + adapter's first choice clearly ahead of its second. A merged
    # answer differing at one of them is a disagreement (refused); elsewhere it is a near tie.
    top2 = ref.topk(2, dim=-1).indices if ref.shape[-1] > 1 else torch.stack([t_ref, t_ref], -1)
    decisive = int(clearly(top2[:, 0], top2[:, 1]).sum())
    return {
        "verdict": verdict,
        "equivalent": verdict == "equivalent",
        "noise_abs_logit_diff": passes["noise_abs"],
        "noise_relative": rel_noise,
        "noise_factor": NOISE_FACTOR if tolerance is None else None,
        "tolerance_relative": NOISE_FACTOR * rel_noise if tolerance is None else None,
        "verifiable_factor": VERIFIABLE_FACTOR,
        "base_logit_scale": passes["base_scale"],
        "logit_scale": float(_rms(ref).max()),
        "logit_diff_ratio": diff_ratio,
        "max_abs_logit_diff": float(diff.max()),
        "worst_abs_logit_diff": float(diff.flatten()[worst]),  # at the logit closest to failing,
        "worst_tolerance_abs": float(tol.flatten()[worst]),  # and its tolerance
        "tolerance_abs": float(tol.max()),  # the widest: every logit within its own implies max diff <= this
        "worst_position": worst // ref.shape[-1],
        "adapter_effect_ratio": effect_ratio,
        "adapter_effect_abs_logit_diff": float(effect.max()),
        "merged_to_base_ratio": to_off_ratio,
        "worst_position_to_base_ratio": float(off_pos[worst // ref.shape[-1]]),
        "merged_to_base_abs_logit_diff": float(to_base.max()),
        "answer_positions": n,
        "answers_agree": agree,
        "answer_agreement": agree / n if n else 1.0,
        "answers_decisive": decisive,
        # No decisive position disagreed (else refused): the per-token rate of such disagreements
        # is below 1 - 0.05^(1/d) with 95 % confidence (exact binomial, ~3/d: "rule of three").
        "answer_disagreement_bound_95": 1 - 0.05 ** (1 / decisive) if decisive else None,
        "adapter_changed_answers": int(changed.sum()),
        "answers_lost_to_base": int(lost_tokens.sum()),
        "answers_disagree": int(disagree.sum()),
        "effect_lost": lost,
    }
