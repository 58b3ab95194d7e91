"""Build a tiny random-weight Qwen2.5-VL model folder that loads exactly like the real one.

The folder has what ``Qwen/Qwen2.5-VL-7B-Instruct`` has — config.json, safetensors weights,
tokenizer files, preprocessor/video-processor config, chat template, generation config — so
training, merging, inference and serving run through the same ``AutoProcessor`` /
``AutoModelForImageTextToText`` code path with no hub access. Only the sizes differ:

    tiny        builds in seconds; used by the tests (hidden 64, 2 layers, vision depth 2)
    small       a few million parameters; learns the synthetic task on 2 CPU cores in minutes
    real-width  the 7B's real widths (text 3584/18944, 28 heads, 4 KV heads, 152064 embedding rows,
                mrope [16,24,24]; vision 1280 wide, 16 heads, merger to 3584) with 1 text layer and
                2 vision blocks: 1.4 B parameters, every matrix the 7B's shape; saved in bf16
    7b-random   the full Qwen2.5-VL-7B architecture (28 layers, 32 vision blocks), random weights,
                saved in bf16 (16 GB): for a GPU host that has no hub (benchmarks/gpu_check.sh)

tiny/small are the demo models (``tiny_model_info.json`` says ``"recipe": "demo"``, which
train/recipes.py reads); the 7B-shaped sizes train with the 7B LoRA recipe.

The tokenizer is a byte-level BPE trained on the prepared dataset's own text (prompts,
answers, fields of every split), so a short sequence covers a whole answer; it keeps every
Qwen special-token string, and all special ids in the config are looked up from it.

    riskva tiny-model --output_dir models/tiny --dataset_path data/prepared --size small
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Iterator

from riskva_core.atomic import atomic_dir, write_json
from riskva_core.data.conversation import PromptTemplate
from riskva_core.errors import RiskvaError
from riskva_core.data.samples import SPLITS, detect_format, read_samples, split_file

# The released chat template, verbatim (REFERENCE.md): the tiny model must format
# conversations byte-for-byte like Qwen2.5-VL-7B-Instruct.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Special tokens of the released tokenizer, in id order (REFERENCE.md).
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# The released tokenizer's pre-tokenisation split (tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2VLImageProcessor defaults; the pixel budget is overridden per training run.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280

# Model dims. Text head_dim = hidden / heads, and mrope_section must sum to head_dim / 2.
SIZES: dict[str, dict] = {
    "tiny": dict(
        vocab_size=1024,
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3]),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1]),
    ),
    "small": dict(
        vocab_size=2048,
        text=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[8, 12, 12]),
        vision=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, fullatt_block_indexes=[3]),
    ),
}
# Qwen2.5-VL-7B-Instruct's config.json (REFERENCE.md); only the depths differ between the two sizes.
_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                mrope_section=[16, 24, 24], max_window_layers=28, sliding_window=32768)
_7B_VISION = dict(hidden_size=1280, intermediate_size=3420, num_heads=16)
SIZES["real-width"] = dict(vocab_size=2048, embed_rows=152064, dtype="bfloat16", recipe="lora",
                           text=dict(_7B_TEXT, num_hidden_layers=1),
                           vision=dict(_7B_VISION, depth=2, fullatt_block_indexes=[1]))
SIZES["7b-random"] = dict(vocab_size=2048, embed_rows=152064, dtype="bfloat16", recipe="lora",
                          text=dict(_7B_TEXT, num_hidden_layers=28),
                          vision=dict(_7B_VISION, depth=32, fullatt_block_indexes=[7, 15, 23, 31]))
DEMO_SIZES = ("tiny", "small")


@dataclasses.dataclass
class TinyModelConfig:
    output_dir: Path
    dataset_path: Path
    size: str = "tiny"
    seed: int = 0
    vocab_size: int | None = None  # BPE target size; default per --size
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self.dataset_path = Path(self.dataset_path)
        if self.size not in SIZES:
            raise RiskvaError(f"--size must be one of {sorted(SIZES)}, got {self.size!r}")
        if self.vocab_size is None:
            self.vocab_size = SIZES[self.size]["vocab_size"]
        if self.vocab_size < 300:
            raise RiskvaError(f"--vocab_size must be >= 300 (256 byte symbols + merges), got {self.vocab_size}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise RiskvaError("--min_pixels must be positive and <= --max_pixels")


def _corpus(dataset_path: Path) -> Iterator[str]:
    """Every text the model will read or write: prompts, answers and fields of all splits."""
    detect_format(dataset_path)  # a clear error for a missing or non-prepared folder
    template = PromptTemplate()
    info = dataset_path / "dataset_info.json"
    if info.is_file():
        try:
            data = json.loads(info.read_text(encoding="utf-8"))
            if isinstance(data.get("prompt_template"), dict):
                template = PromptTemplate(**data["prompt_template"])
        except (json.JSONDecodeError, TypeError):
            pass
    yield template.system_prompt
    yield template.instruction
    yield "You are a helpful assistant."
    found = False
    for split in SPLITS:
        try:
            split_file(dataset_path, split)
        except RiskvaError:
            continue
        for s in read_samples(dataset_path, split):
            found = True
            for msg in s.messages:
                content = msg.get("content")
                if isinstance(content, str):
                    yield content
                else:
                    yield from (c["text"] for c in content or [] if c.get("type") == "text" and c.get("text"))
            yield from (v for v in s.fields.values() if v)
    if not found:
        raise RiskvaError(f"--dataset_path {dataset_path}: no prepared train/val/test samples to train a tokenizer on")


def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with Qwen2's normaliser and pre-tokeniser, wrapped as Qwen2Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # Sorted (not deduplicated): counts keep their weight, order no longer depends on the data order.
    bpe.train_from_iterator(sorted(texts), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    vocab = dict(model["vocab"])
    # Specials follow the regular vocabulary in the released order, as in Qwen's own tokenizer.
    for t in SPECIAL_TOKENS:
        vocab.setdefault(t, len(vocab))
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD_TOKEN, EOS_TOKEN)],
        errors="replace",
        split_special_tokens=False,
        model_max_length=32768,
    )
    # Qwen2Tokenizer registers its named specials on init; add the rest in released id order.
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    missing = [t for t in SPECIAL_TOKENS if tok.convert_tokens_to_ids(t) is None]
    if missing:
        raise RuntimeError(f"tokenizer lacks special tokens {missing}")
    return tok


def token_id(tokenizer, token: str) -> int:
    """Id of a special token by its string; fails loudly instead of falling back to unk."""
    idx = tokenizer.convert_tokens_to_ids(token)
    if idx is None or tokenizer.convert_ids_to_tokens(idx) != token:
        raise RiskvaError(f"tokenizer has no token {token!r}")
    return int(idx)


def build_config(tokenizer, size: str):
    from transformers import Qwen2_5_VLConfig

    dims = SIZES[size]
    # Round the embedding up like the released model (152064 rows for 151665 tokens).
    vocab = max(-(-len(tokenizer) // 64) * 64, dims.get("embed_rows", 0))
    text = dict(dims["text"])
    mrope = text.pop("mrope_section")
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    if sum(mrope) * 2 != head_dim:
        raise RuntimeError(f"mrope_section {mrope} must sum to head_dim/2 = {head_dim // 2}")
    ids = {name: token_id(tokenizer, t) for name, t in (
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    )}
    pad_id = token_id(tokenizer, PAD_TOKEN)
    eos_id = token_id(tokenizer, EOS_TOKEN)
    vision = dict(dims["vision"])
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
            bos_token_id=pad_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            tie_word_embeddings=False,
            use_cache=True,
            **text,
        ),
        vision_config=dict(
            out_hidden_size=text["hidden_size"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            tokens_per_second=2,
            in_channels=3,
            hidden_act="silu",
            **vision,
        ),
        tie_word_embeddings=False,
        **ids,
    )
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


def build_processor(tokenizer, min_pixels: int, max_pixels: int):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(
        size=size, patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=IMAGE_MEAN, image_std=IMAGE_STD
    )
    video_processor = Qwen2VLVideoProcessor(
        size=size, patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=IMAGE_MEAN, image_std=IMAGE_STD
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(cfg: TinyModelConfig) -> Path:
    """Write the model folder atomically; same dataset + size + seed → same files."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    texts = list(_corpus(cfg.dataset_path))
    tokenizer = build_tokenizer(texts, cfg.vocab_size)
    processor = build_processor(tokenizer, cfg.min_pixels, cfg.max_pixels)
    config = build_config(tokenizer, cfg.size)

    torch.manual_seed(cfg.seed)
    dims = SIZES[cfg.size]
    dtype = getattr(torch, dims.get("dtype", "float32"))
    # The 7B-shaped sizes are initialised straight in bf16 (8 B fp32 parameters would need 33 GB),
    # on the GPU when there is one (random init of billions of weights is minutes on a CPU).
    device = "cuda" if dims.get("dtype") and torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.config.dtype = dtype
    if dims.get("embed_rows"):
        # The 7B-shaped sizes have 152064 output rows for ~2k tokens: rows past the tokenizer are ids
        # no tokenizer decodes. A trained model never emits them, but random ones win almost every
        # argmax there and the stand-in would answer empty text through infer and serve. (The small
        # sizes round up by < 64 rows and keep their bytes.)
        with torch.no_grad():
            model.get_output_embeddings().weight[len(tokenizer):].zero_()
    eos_id, pad_id = token_id(tokenizer, EOS_TOKEN), token_id(tokenizer, PAD_TOKEN)
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, pad_token_id=pad_id, eos_token_id=[eos_id, pad_id], do_sample=False,
    )
    with atomic_dir(cfg.output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        write_json(tmp / "tiny_model_info.json", {
            "size": cfg.size,
            "recipe": dims.get("recipe", "demo"),
            "dtype": str(dtype).removeprefix("torch."),
            "seed": cfg.seed,
            "parameters": n_params,
            "vocab_size_bpe": cfg.vocab_size,
            "tokens": len(tokenizer),
            "dataset_path": str(cfg.dataset_path),
        })
    return cfg.output_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="riskva tiny-model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True, type=Path, help="model folder to write (replaced atomically)")
    p.add_argument("--dataset_path", required=True, type=Path,
                   help="prepared JSONL/Parquet folder whose text trains the tokenizer")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny",
                   help="tiny: seconds to build, for tests; small: a few M params, learns the demo task; "
                   "real-width: the 7B's widths, 1 layer (1.4 B, bf16); 7b-random: the full 7B shape (bf16)")
    p.add_argument("--seed", type=int, default=0, help="weight-initialisation seed (default 0)")
    p.add_argument("--vocab_size", type=int, default=None, help="BPE vocabulary size (default per --size)")
    p.add_argument("--min_pixels", type=int, default=DEFAULT_MIN_PIXELS,
                   help=f"processor min pixels per image (default {DEFAULT_MIN_PIXELS})")
    p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"processor max pixels per image (default {DEFAULT_MAX_PIXELS}); training overrides it")
    a = p.parse_args(argv)
    out = build_tiny_model(TinyModelConfig(**vars(a)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
