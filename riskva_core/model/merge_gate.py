"""The merge gate: a merge is judged by what the merged model DOES, against bf16's own noise.

A bf16 merge cannot be bit-exact: ``round(W + B·A·scale)`` is not ``W·x + B·A·x·scale``, and
the difference grows with depth (the 28-layer 7B's merged and unmerged logits differ by ~0.4
where a one-layer stand-in's differ by ~0.01). So no fixed tolerance is right for every model.
The yardstick here is measured on the model itself, on the same inputs:

    noise      the BASE model's own bf16-vs-fp32 difference: the same forward pass, once in the
               merge dtype and once with every module computing in the next wider float
               (``computed_in``: weights widened one module at a time, restored exactly, so a
               7B never exists in fp32). It is what rounding to this dtype costs at this depth.
    tolerance  NOISE_FACTOR x noise (+ one spacing of the dtype at the largest logit), the noise
               taken relative to the base's logit scale and applied at the larger of the base's
               and base + adapter's scales (a trained lm_head can make logits many times the
               random base's, and every rounding with them). Merged and unmerged bf16 are two
               computations, each off the exact result by about that noise (√2 if independent,
               2 at worst), and the merge rounds each adapted weight once more, at most half an
               ulp — the same order as rounding one matmul output. 4 covers that with room to spare.

The probe: a few held-out samples (the prepared dataset's test, else val split, named in the
adapter's dataset.json; else a fixed drawn image) with the training prompt; base + adapter
answers each greedily (``answer_tokens`` tokens), and every model is then run teacher-forced on
prompt + that answer, keeping only the answer positions' logits (``logits_to_keep``).

Verdict (``judge``): equivalent when the merged logits are within the tolerance of base +
adapter's AND the merged greedy answer agrees (a differing token is allowed only where base +
adapter itself had a near tie within 2 x tolerance). The adapter's effect counts as LOST when
the merged model answers like the base where base + adapter does not (beyond 2 x tolerance),
or fails the logits check while lying closer to the base than to base + adapter.
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
PROBE_SAMPLES = 2
ANSWER_TOKENS = 16
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
        """Float32 logits at the answer positions, all probes concatenated: [positions, vocab]."""
        import torch

        rows = []
        with torch.no_grad():
            for batch, n_new in self.batches:
                # Position i predicts token i+1: the n_new positions before the last predict the answer.
                out = model(**batch, logits_to_keep=n_new + 1).logits[0, :-1]
                rows.append(out.float().cpu())
        return torch.cat(rows)


def judge(ref, base, noisy_ref_base, merged, dtype, tolerance: float | None = None) -> dict[str, Any]:
    """The gate's figures and verdict (see the module docstring). All [positions, vocab] float32.

    ``base`` / ``noisy_ref_base``: the base model in the merge dtype / computed one float wider.
    """
    import torch

    noise = float((noisy_ref_base - base).abs().max())
    scale = float(ref.abs().max())
    base_scale = float(base.abs().max())
    # Rounding noise is relative to the values computed: an adapter that also trains the output
    # layer (the demo recipe's lm_head) makes logits many times the random base's, and its
    # merged-vs-unmerged difference grows with them. So the base's noise is carried over as a share
    # of its own logit scale, applied to the larger of the two scales.
    rel_noise = noise / base_scale if base_scale > 0 else 0.0
    noise_at_scale = rel_noise * max(scale, base_scale)
    floor = torch.finfo(dtype).eps * scale  # the spacing of stored logits: nothing is compared finer
    tol = float(tolerance) if tolerance is not None else NOISE_FACTOR * noise_at_scale + floor
    diff = float((merged - ref).abs().max())
    t_ref, t_base, t_m = ref.argmax(-1), base.argmax(-1), merged.argmax(-1)

    def margin(logits, a, b):  # how much ``logits`` prefers token a over token b, per position
        return logits.gather(-1, a[:, None])[:, 0] - logits.gather(-1, b[:, None])[:, 0]

    # Where base + adapter answers differently from the base, clearly (beyond the noise).
    changed = (t_ref != t_base) & (margin(ref, t_ref, t_base) > 2 * tol)
    lost_tokens = changed & (t_m == t_base)
    disagree = (t_m != t_ref) & (margin(ref, t_ref, t_m) > 2 * tol)
    to_base = float((merged - base).abs().max())
    lost = bool(lost_tokens.any()) or (diff > tol and to_base < diff)
    return {
        "noise_abs_logit_diff": noise,
        "noise_relative": rel_noise,
        "base_logit_scale": base_scale,
        "noise_factor": NOISE_FACTOR if tolerance is None else None,
        "tolerance_abs": tol,
        "logit_scale": scale,
        "max_abs_logit_diff": diff,
        "adapter_effect_abs_logit_diff": float((ref - base).abs().max()),
        "merged_to_base_abs_logit_diff": to_base,
        "answer_positions": int(t_ref.numel()),
        "answer_agreement": float((t_m == t_ref).float().mean()) if t_ref.numel() else 1.0,
        "adapter_changed_answers": int(changed.sum()),
        "answers_lost_to_base": int(lost_tokens.sum()),
        "answers_disagree": int(disagree.sum()),
        "effect_lost": lost,
        "equivalent": diff <= tol and not bool(disagree.any()) and not lost,
    }
