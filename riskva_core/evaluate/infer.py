"""Batch inference: images in, parsed risk reports out (JSON), optionally scored.

    riskva infer --model_path M --image_path photo.jpg
    riskva infer --model_path M --image_list list.txt --output_file out.json
    riskva infer --model_path M --parquet_file test.parquet --output_file out.json --compare_gt --report_dir REPORT
    riskva infer --model_path M --dataset_path PREPARED --split test --compare_gt --report_dir REPORT

``M`` is a merged model folder, a base model folder with ``--adapter_path`` (LoRA applied
without merging), a LoRA adapter folder alone (its base comes from adapter_config.json), or an
MLflow model URI (``models:/riskva@champion``, ``runs:/<id>/model``) whose pyfunc carries the
merged model as the artifact ``model_dir`` (resolved by riskva_core.model.resolve).

One code path for every caller: ``Generator`` loads the processor saved with the model (so
images are resized exactly as in training), builds the prompt from the model's
``prompt_template.json`` (else the default PromptTemplate) with the processor's chat template,
and generates greedily in left-padded batches with a fixed seed. The CLI, the MLflow pyfunc
(hence evaluation and both HTTP servers) all call ``Generator.load_image`` (the model's
image policy, data/image_policy.py) and ``Generator.generate`` through ``run_items``.

A bad image (missing, unreadable, corrupt, too large, or a prompt too long for the model's
context) becomes an entry with ``error`` and the run goes on. Only what a photo can cause is
turned into such an entry (``PhotoError`` and the image policy's ``RiskvaError``); any other
exception (``TypeError``, ``IndexError``, a ``ValueError`` from the processor...) is a bug and
stops the run with its traceback, never scored as a wrong answer. A batch that runs out of device
memory is answered again one photo at a time (the others in it are not at fault); one photo alone
out of memory is an infrastructure failure and propagates (the pyfunc answers 503, evaluation
stops; see evaluate/predict.py). Exit status: 0 when every image was answered, otherwise the number of failed
images capped at 100 (input errors such as a missing flag exit 2 before anything runs, so a
status of 1-100 after a run always means "this many images failed").
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from riskva_core.atomic import write_json
from riskva_core.data.conversation import PromptTemplate
from riskva_core.data.image_policy import DEFAULT_MAX_DECODED_PIXELS, ImagePolicy
from riskva_core.errors import RiskvaError, is_out_of_memory
from riskva_core.evaluate.generation import (DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, check_penalty,
                                             generation_settings, greedy_config)
from riskva_core.evaluate.inputs import Item, image_items, read_image_list, sample_items
from riskva_core.evaluate.parse import parse_answer
from riskva_core.evaluate.usage import token_usage
from riskva_core.model.resolve import MLFLOW_SCHEMES, adapter_base, download_mlflow_model, resolve_model_ref
from riskva_core.schema import FIELD_LEVEL, FIELDS

PROMPT_TEMPLATE_FILE = "prompt_template.json"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
MAX_EXIT_FAILURES = 100


class PhotoError(RiskvaError):
    """An error one photo causes in generation (e.g. its prompt exceeds the model's context): that
    photo's entry gets it as ``error``; never raised for a fault of the code."""


def load_prompt_template(*folders: str | Path | None) -> PromptTemplate:
    """The template saved with the model (first folder that has one), else the default."""
    for folder in folders:
        if folder is not None and (Path(folder) / PROMPT_TEMPLATE_FILE).is_file():
            return PromptTemplate.load(Path(folder) / PROMPT_TEMPLATE_FILE)
    return PromptTemplate()


class Generator:
    """A loaded model + processor that turns images into answer texts, deterministically.

    ``generate(images)`` runs the images as ONE left-padded batch; callers choose the batch
    size (``infer`` and the pyfunc chunk their inputs).
    """

    def __init__(
        self,
        model_path: str | Path,
        adapter_path: str | Path | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        dtype: str | None = None,
        device: str = "auto",
        seed: int = 0,
        prompt_template: PromptTemplate | None = None,
        max_decoded_pixels: int | None = None,
        attn_implementation: str | None = None,
        repetition_penalty: float | None = None,
    ):
        import torch

        from riskva_core.model.loading import dtype_name, is_adapter_dir, load_model, load_processor, resolve_dtype

        if max_new_tokens < 1:
            raise RiskvaError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = int(max_new_tokens)
        self.seed = int(seed)
        self.repetition_penalty = check_penalty(repetition_penalty)
        download: Path | None = None
        path = str(model_path)
        try:
            if path.startswith(MLFLOW_SCHEMES):
                local, download = download_mlflow_model(path)
                path = str(local)
            elif not Path(path).is_dir():  # a hub id: the cached snapshot (HF_HUB_OFFLINE honoured)
                path = str(resolve_model_ref(path, "--model_path"))
            if adapter_path is None and Path(path).is_dir() and is_adapter_dir(path):
                adapter_path, path = path, adapter_base(Path(path))
            if adapter_path is not None and not Path(adapter_path).is_dir():
                raise RiskvaError(f"--adapter_path {adapter_path}: no such folder")
            # Training saves the processor (with its pixel budget) next to the adapter.
            proc_src = adapter_path if adapter_path is not None and any(
                (Path(adapter_path) / f).is_file() for f in PROCESSOR_FILES) else path
            self.processor = load_processor(proc_src)
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.device = torch.device(device)
            # The loading policy (loading.py): bf16 on a bf16 GPU; on a CPU the checkpoint's own dtype
            # (bf16 for a 7B: 15 GB, where float32 would need 33 GB) when the CPU computes bf16.
            checkpoint = path if Path(path).is_dir() else resolve_model_ref(path, "--model_path")  # adapter's base
            self.dtype = dtype_name(resolve_dtype(dtype or "auto", self.device, checkpoint=checkpoint))
            self.model = load_model(path, adapter_path, dtype=self.dtype, attn_implementation=attn_implementation,
                                    device=self.device, flag="--model_path").to(self.device).eval()
            self.template = prompt_template or load_prompt_template(adapter_path, path)
            # Saved by training next to the processor: prepare's cap + JPEG round trip.
            self.image_policy = ImagePolicy.load(adapter_path, path).with_limit(max_decoded_pixels)
        finally:
            if download is not None:  # weights are in memory now
                shutil.rmtree(download, ignore_errors=True)
        self.model_path, self.adapter_path = path, adapter_path
        tok = self.processor.tokenizer
        tok.padding_side = "left"  # generation appends on the right: prompts must end aligned
        self.prompt = self.processor.apply_chat_template(
            self.template.messages(None), tokenize=False, add_generation_prompt=True
        )
        self.generation_config = self._generation_config()
        self.level_scores = _level_scores(tok)  # the 风险等级 confidence (evaluate/confidence.py), or None

    def _generation_config(self):
        return greedy_config(self.model.generation_config, self.max_new_tokens, self.repetition_penalty,
                             self.processor.tokenizer.pad_token_id)

    @property
    def generation_settings(self) -> dict[str, Any]:
        """What decoding used, recorded in every report (``report.json`` → ``provenance.generation``)."""
        return generation_settings(self.max_new_tokens, self.repetition_penalty, self.seed)

    def _check_length(self, prompt_tokens: list[int]) -> None:
        """``PhotoError`` when a prompt (its image tokens, set by the photo's size and the processor's
        pixel budget) plus ``max_new_tokens`` exceeds the model's context, which generation would
        otherwise overrun (position ids past what the model was built for)."""
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        context = getattr(text, "max_position_embeddings", None)
        longest = max(prompt_tokens, default=0)
        if context and longest + self.max_new_tokens > context:
            raise PhotoError(f"prompt of {longest} tokens (with the image's) + max_new_tokens {self.max_new_tokens} "
                             f"exceeds the model's context of {context} tokens")

    def load_image(self, data: bytes, name: str) -> Image.Image:
        """Image bytes → the model's input image, through the model's image policy."""
        return self.image_policy.apply(data, name)

    def generate(self, images: Sequence[Image.Image]) -> list[str]:
        """Answer texts for ``images`` (RGB PIL images), one left-padded greedy batch."""
        import torch

        self.last_usage: list[dict[str, int]] = []  # per image, OpenAI's usage (evaluate/usage.py)
        if not images:
            return []
        enc = self.processor(
            text=[self.prompt] * len(images), images=list(images), padding=True, return_tensors="pt"
        ).to(self.device)
        self._check_length(enc["attention_mask"].sum(dim=1).tolist())
        torch.manual_seed(self.seed)
        scores = getattr(self, "level_scores", None)
        extra = {"logits_processor": [scores]} if scores is not None else {}
        if scores is not None:
            scores.reset()
        with torch.inference_mode():
            out = self.model.generate(**enc, generation_config=self.generation_config, **extra)
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        self.last_usage = token_usage(enc["attention_mask"], new_tokens, self.generation_config.eos_token_id)
        if scores is not None:  # rides with the usage to the pyfunc's level_confidence column
            key = self.processor.tokenizer.encode(FIELD_LEVEL, add_special_tokens=False)
            for usage, conf in zip(self.last_usage, scores.confidences(new_tokens.cpu(), key)):
                usage["level_confidence"] = conf
        return [t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


def _level_scores(tokenizer: Any) -> Any:
    from riskva_core.evaluate.confidence import LevelScores, level_token_ids

    try:
        return LevelScores(level_token_ids(tokenizer))
    except (ValueError, TypeError, AttributeError):  # levels sharing a first token: no confidence
        return None


# ---------------------------------------------------------------- config + entry

@dataclasses.dataclass
class InferConfig:
    model_path: str
    image_path: Path | None = None
    image_list: Path | None = None
    parquet_file: Path | None = None
    jsonl_file: Path | None = None
    dataset_path: Path | None = None
    split: str = "test"
    output_file: Path | None = None
    compare_gt: bool = False
    report_dir: Path | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    adapter_path: Path | None = None
    dtype: str | None = None
    device: str = "auto"
    seed: int = 0
    max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS
    progress: bool = True
    attn_implementation: str | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        for name in ("image_path", "image_list", "parquet_file", "jsonl_file", "dataset_path", "output_file",
                     "report_dir", "adapter_path"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
        sources = [n for n in ("image_path", "image_list", "parquet_file", "jsonl_file", "dataset_path")
                   if getattr(self, n) is not None]
        if len(sources) != 1:
            raise RiskvaError(
                "give exactly one input: --image_path, --image_list, --parquet_file, --jsonl_file or --dataset_path"
                + (f" (got {', '.join('--' + s for s in sources)})" if sources else "")
            )
        self.source = sources[0]
        if self.source != "image_path":  # a single bad image is reported as a failed entry, not here
            src = getattr(self, self.source)
            if not src.exists():
                raise RiskvaError(f"--{self.source} {src}: no such file or folder")
        if self.source in ("parquet_file", "jsonl_file") and not getattr(self, self.source).is_file():
            raise RiskvaError(f"--{self.source} {getattr(self, self.source)}: not a file")
        if self.compare_gt and self.source in ("image_path", "image_list"):
            raise RiskvaError("--compare_gt needs ground truth: use --parquet_file, --jsonl_file or --dataset_path")
        if self.report_dir is not None and not self.compare_gt:
            raise RiskvaError("--report_dir scores against ground truth: add --compare_gt")
        if self.batch_size < 1:
            raise RiskvaError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise RiskvaError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_penalty(self.repetition_penalty)
        ImagePolicy(max_decoded_pixels=self.max_decoded_pixels)  # validates the limit before any model loads
        if self.output_file is None and self.report_dir is not None:
            self.output_file = self.report_dir / "predictions.json"
        if self.output_file is None and self.source != "image_path":
            raise RiskvaError(f"--{self.source} answers many images: give --output_file (or --report_dir)")

    def items(self) -> list[Item]:
        if self.source == "image_path":
            return image_items([str(self.image_path)], None)
        if self.source == "image_list":
            return image_items(read_image_list(self.image_list), self.image_list.parent)
        return sample_items(getattr(self, self.source), self.split)


def _record(item: Item, raw: str | None, error: str | None, with_gt: bool, usage: dict | None = None) -> dict:
    if error is None:
        result = parse_answer(raw or "")
        parsed, ok = result.parsed, result.parse_ok
    else:
        parsed, ok = {f: None for f in FIELDS}, False
    rec: dict[str, Any] = {
        "id": item.id,
        "image": item.image,
        "image_id": item.image_id,
        "image_path": item.image_path,
        "raw_output": raw,
        "parsed": parsed,
        "parse_ok": ok,
    }
    if error is not None:
        rec["error"] = error
    rec.update({"usage": usage} if usage is not None else {})
    if with_gt and item.ground_truth is not None:
        rec["ground_truth"] = item.ground_truth
        rec["group"] = item.group  # the split's near-duplicate group: evaluate resamples whole groups
    return rec


def _answer(generator: Generator, good: list[tuple[int, Image.Image]]) -> list[tuple[int, str | None, str | None,
                                                                                   dict | None]]:
    """(row, text, error, usage) for one batch. A ``PhotoError`` or an out-of-memory error of a batch of
    several photos runs them one at a time, so only the photo at fault gets an error; anything else
    (a bug) propagates untouched, with its traceback, and is never retried."""
    try:
        texts = generator.generate([img for _, img in good])
        return [(i, t, None, u) for (i, _), t, u in zip(good, texts, generator.last_usage)]
    except PhotoError as exc:
        if len(good) == 1:
            return [(good[0][0], None, str(exc), None)]
    except Exception as exc:
        if not (is_out_of_memory(exc) and len(good) > 1):
            raise
    # Outside the except block: the error's traceback (and the batch's tensors it holds) is gone.
    _release_device_memory()
    return [outcome for pair in good for outcome in _answer(generator, [pair])]


def _release_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_items(generator: Generator, items: Sequence[Item], batch_size: int, with_gt: bool = False,
              progress: bool = True) -> list[dict[str, Any]]:
    """Answer every item in order; what a photo causes becomes its error record, the batch goes on;
    a bug stops the run (see the module docstring)."""
    from tqdm import tqdm

    records: list[dict[str, Any] | None] = [None] * len(items)
    bar = tqdm(total=len(items), unit="img", desc="infer", disable=not progress or len(items) <= 1)
    try:
        for start in range(0, len(items), batch_size):
            chunk = list(enumerate(items[start:start + batch_size], start))
            good: list[tuple[int, Image.Image]] = []
            for i, item in chunk:
                try:
                    good.append((i, generator.load_image(item.read(), item.image_path)))
                except RiskvaError as exc:
                    records[i] = _record(item, None, str(exc), with_gt)
            for i, text, err, used in _answer(generator, good) if good else []:
                records[i] = _record(items[i], text, err, with_gt, used)
            bar.update(len(chunk))
    finally:
        bar.close()
    return [r for r in records if r is not None]


def infer(cfg: InferConfig, generator: Generator | None = None) -> list[dict[str, Any]]:
    """Run ``cfg``; write the predictions (and the report); return the records."""
    items = cfg.items()
    if generator is None:
        generator = Generator(cfg.model_path, cfg.adapter_path, cfg.max_new_tokens, cfg.dtype, cfg.device, cfg.seed,
                              max_decoded_pixels=cfg.max_decoded_pixels,
                              attn_implementation=cfg.attn_implementation,
                              repetition_penalty=cfg.repetition_penalty)
    records = run_items(generator, items, cfg.batch_size, cfg.compare_gt, cfg.progress)
    if cfg.output_file is not None:
        write_json(cfg.output_file, records)
    if cfg.report_dir is not None:
        from riskva_core.evaluate.report import evaluate

        evaluate(records, cfg.report_dir, image_root=getattr(cfg, cfg.source),
                 provenance={"generation": generator.generation_settings})
    return records


def format_record(rec: dict[str, Any]) -> str:
    """A readable terminal report for one image."""
    lines = [f"图片 / image: {rec['image']}"]
    if rec.get("error"):
        return "\n".join(lines + [f"错误 / error: {rec['error']}"])
    for f in FIELDS:
        value = rec["parsed"].get(f)
        lines.append(f"{f}: {value if value is not None else '(未找到 / missing)'}")
    if not rec["parse_ok"]:
        lines += ["", "⚠ the answer did not parse into the four fields; raw output:", rec["raw_output"] or ""]
    return "\n".join(lines)


def n_failed(records: Sequence[dict[str, Any]]) -> int:
    return sum(1 for r in records if r.get("error"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="riskva infer",
        description="Run the model on an image, an image list, a Parquet/JSONL file or a prepared split.",
        epilog="Exit status: 0 when every image was answered; otherwise the number of failed images "
        f"(capped at {MAX_EXIT_FAILURES}); 2 for a bad flag or input before any image is run.",
    )
    p.add_argument("--model_path", required=True,
                   help="merged model folder, base model folder (with --adapter_path), LoRA adapter folder, "
                   "or an MLflow model URI such as models:/riskva@champion")
    p.add_argument("--adapter_path", type=Path, default=None,
                   help="LoRA adapter folder applied to --model_path without merging")
    src = p.add_argument_group("input (exactly one)")
    src.add_argument("--image_path", type=Path, help="one image; prints a readable report")
    src.add_argument("--image_list", type=Path,
                     help="text file with one image path per line (relative paths are relative to the list's "
                     "folder; blank lines and # comments are skipped)")
    src.add_argument("--parquet_file", type=Path, help="a prepared .parquet file (images embedded)")
    src.add_argument("--jsonl_file", type=Path, help="a prepared .jsonl file (images beside it)")
    src.add_argument("--dataset_path", type=Path, help="a prepared dataset folder; see --split")
    p.add_argument("--split", default="test", help="split of --dataset_path to run (default test)")
    p.add_argument("--output_file", type=Path, default=None,
                   help="predictions JSON (required for many images unless --report_dir, which defaults it "
                   "to REPORT/predictions.json)")
    p.add_argument("--compare_gt", action="store_true",
                   help="add each sample's ground truth to its prediction (dataset inputs only)")
    p.add_argument("--report_dir", type=Path, default=None,
                   help="with --compare_gt: also write the evaluation report (report.json/md/html) here")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per generation batch (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"longest answer in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--repetition_penalty", type=float, default=None,
                   help="repetition penalty for decoding (default: none, i.e. 1.0, whatever the base model's "
                   "generation_config says: training never used one)")
    p.add_argument("--torch_dtype", "--dtype", dest="dtype", default=None,
                   help="auto | bfloat16 | float32 (default auto: bf16 on a bf16-capable GPU; on a CPU the "
                   "checkpoint's own dtype, bf16 for Qwen2.5-VL-7B, when the CPU computes bf16, else float32); "
                   "float16 is refused (Qwen2.5-VL overflows in it)")
    p.add_argument("--attn_implementation", default=None, choices=["auto", "sdpa", "flash_attention_2", "eager"],
                   help="attention kernel (default auto: flash_attention_2 when installed on a GPU, else sdpa)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--seed", type=int, default=0, help="torch seed set before every batch (default 0)")
    p.add_argument("--max_decoded_pixels", type=int, default=DEFAULT_MAX_DECODED_PIXELS,
                   help="refuse (as a failed entry) an image whose header says more pixels than this, before "
                   f"decoding it (default {DEFAULT_MAX_DECODED_PIXELS})")
    p.add_argument("--no_progress", dest="progress", action="store_false", help="hide the progress bar")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = InferConfig(**vars(args))
    records = infer(cfg)
    if cfg.source == "image_path":
        print(format_record(records[0]))
    failed = n_failed(records)
    ok = sum(1 for r in records if r["parse_ok"])
    if cfg.source != "image_path" or cfg.output_file is not None:
        print(f"{len(records)} images: {ok} parsed, {len(records) - ok - failed} unparsed, {failed} failed"
              + (f" -> {cfg.output_file}" if cfg.output_file else "")
              + (f"; report {cfg.report_dir / 'report.html'}" if cfg.report_dir else ""))
    return min(failed, MAX_EXIT_FAILURES)
