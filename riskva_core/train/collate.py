"""Turn prepared samples into model batches: chat template, processor, assistant-only labels.

Each sample is formatted with the processor's own chat template and tokenised by the
processor together with its image, exactly as inference will see it. Labels are -100
everywhere except the assistant answer and its closing ``<|im_end|>``: the model learns
to write the report, not to repeat the prompt. The assistant span is found from token
strings looked up in the tokenizer (``<|im_start|>`` + "assistant\\n" … ``<|im_end|>``),
never from hard-coded ids, so the same code serves the tiny model and the 7B.

Samples longer than ``max_length`` are dropped before training (their length is computed
from the image header and the text, without decoding pixels) and counted; they are never
truncated, because cutting through the image tokens would desynchronise the image
features from their placeholders.
"""
from __future__ import annotations

import dataclasses
import io
import random
from typing import Any, Sequence

import torch
from PIL import Image

from riskva_core.data.conversation import PromptTemplate
from riskva_core.errors import RiskvaError
from riskva_core.data.samples import Sample

IGNORE_INDEX = -100
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_PAD = "<|image_pad|>"


def _token_id(tokenizer, token: str) -> int:
    idx = tokenizer.convert_tokens_to_ids(token)
    if idx is None or tokenizer.convert_ids_to_tokens(idx) != token:
        raise RiskvaError(f"tokenizer has no token {token!r}; is this a Qwen2.5-VL processor?")
    return int(idx)


@dataclasses.dataclass(frozen=True)
class ChatTokens:
    """The ids that delimit an assistant turn, looked up once from the tokenizer."""

    im_start: int
    im_end: int
    assistant_header: tuple[int, ...]  # the tokens of "assistant\n" right after <|im_start|>
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatTokens":
        im_start = _token_id(tokenizer, IM_START)
        ids = tokenizer(f"{IM_START}assistant\n", add_special_tokens=False)["input_ids"]
        if not ids or ids[0] != im_start:
            raise RiskvaError("tokenizer does not keep <|im_start|> as one token")
        pad = tokenizer.pad_token_id
        if pad is None:
            raise RiskvaError("tokenizer has no pad token")
        return cls(im_start=im_start, im_end=_token_id(tokenizer, IM_END), assistant_header=tuple(ids[1:]), pad=pad)


def assistant_labels(input_ids: Sequence[int], tokens: ChatTokens) -> list[int]:
    """Copy of ``input_ids`` with everything but assistant answers (+ their <|im_end|>) masked."""
    ids = list(input_ids)
    labels = [IGNORE_INDEX] * len(ids)
    h = len(tokens.assistant_header)
    i = 0
    while i < len(ids):
        if ids[i] == tokens.im_start and tuple(ids[i + 1:i + 1 + h]) == tokens.assistant_header:
            start = i + 1 + h
            end = start
            while end < len(ids) and ids[end] != tokens.im_end:
                end += 1
            stop = min(end + 1, len(ids))  # include the closing <|im_end|>: the model must learn to stop
            labels[start:stop] = ids[start:stop]
            i = stop
        else:
            i += 1
    return labels


def sample_messages(sample: Sample, template: PromptTemplate | None) -> list[dict]:
    """The conversation to train on: the prepared one, or rebuilt from fields with ``template``."""
    if template is None:
        if sample.answer is None:
            raise RiskvaError(f"sample {sample.id}: no assistant answer to train on")
        return sample.messages
    return template.messages(None, sample.fields)


def image_size(sample: Sample) -> tuple[int, int]:
    """(height, width) from the image header only; the pixels are not decoded."""
    try:
        if sample.image_file is not None and sample.image_bytes is None:
            with Image.open(sample.image_file) as im:
                w, h = im.size
        else:  # Parquet: the bytes in the sample, or read from the file's row group (lazy)
            with Image.open(io.BytesIO(sample.image_data())) as im:
                w, h = im.size
    except (OSError, Image.DecompressionBombError) as exc:
        raise RiskvaError(f"sample {sample.id}: cannot read image header ({exc})") from None
    return h, w


class SFTDataset(torch.utils.data.Dataset):
    """Samples that fit ``max_length``, encoded on access (in DataLoader workers)."""

    def __init__(self, samples: Sequence[Sample], processor, max_length: int,
                 template: PromptTemplate | None = None, cache_images: bool = False,
                 flip_seed: int | None = None):
        self.processor = processor
        self.flip_seed = flip_seed  # None: images are used as they are
        self.epoch = 0  # the training loop sets it before building each epoch's DataLoader
        self.tokens = ChatTokens.from_tokenizer(processor.tokenizer)
        self.template = template
        self.max_length = max_length
        self.samples: list[Sample] = []
        self.dropped: list[tuple[str, int]] = []  # (sample id, length) of over-long samples
        self.lengths: list[int] = []
        for s in samples:
            n = self.sample_length(s)
            if n > max_length:
                self.dropped.append((s.id, n))
            else:
                self.samples.append(s)
                self.lengths.append(n)
        # Decoded once before workers fork: they share the pages copy-on-write.
        self._images: list[Image.Image] | None = [s.load_image() for s in self.samples] if cache_images else None

    def text(self, sample: Sample) -> str:
        return self.processor.apply_chat_template(sample_messages(sample, self.template), tokenize=False)

    def sample_length(self, sample: Sample) -> int:
        """Token count the processor will produce, computed without decoding the image."""
        ip = self.processor.image_processor
        h, w = image_size(sample)
        n_image_tokens = ip.get_number_of_image_patches(h, w, {}) // (ip.merge_size ** 2)
        text_ids = self.processor.tokenizer(self.text(sample), add_special_tokens=False)["input_ids"]
        n_placeholders = sum(1 for t in text_ids if t == self.processor.image_token_id)
        return len(text_ids) + n_placeholders * (n_image_tokens - 1)

    def __len__(self) -> int:
        return len(self.samples)

    def augment(self, image: Image.Image, idx: int) -> Image.Image:
        """Horizontal and vertical flips, each with p=0.5: a new view of the photo every epoch.

        A close-up of a wall has no up/down or left/right that changes the defect's type or
        extent, so the label holds. The choice is a pure function of (seed, epoch, index), never
        of a worker's RNG, so a resumed run replays exactly the same views.
        """
        if self.flip_seed is None:
            return image
        rng = random.Random(f"{self.flip_seed}:{self.epoch}:{idx}")  # str seeds hash with SHA-512: stable
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        return image

    def __getitem__(self, idx: int) -> dict[str, Any]:
        sample = self.samples[idx]
        image = self._images[idx] if self._images is not None else sample.load_image()
        image = self.augment(image, idx)
        enc = self.processor(text=[self.text(sample)], images=[image], return_tensors="pt")
        input_ids = enc["input_ids"][0]
        labels = torch.tensor(assistant_labels(input_ids.tolist(), self.tokens), dtype=torch.long)
        if (labels != IGNORE_INDEX).sum() == 0:
            raise RiskvaError(f"sample {sample.id}: no assistant tokens after templating")
        item = {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": enc["pixel_values"],
            "image_grid_thw": enc["image_grid_thw"],
        }
        if "mm_token_type_ids" in enc:
            item["mm_token_type_ids"] = enc["mm_token_type_ids"][0]
        return item


@dataclasses.dataclass
class Collator:
    """Right-pads a list of encoded samples into one batch; images are concatenated."""

    pad_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(it["input_ids"]) for it in items)

        def pad(key: str, value: int) -> torch.Tensor:
            out = torch.full((len(items), n), value, dtype=items[0][key].dtype)
            for row, it in enumerate(items):
                out[row, : len(it[key])] = it[key]
            return out

        batch = {
            "input_ids": pad("input_ids", self.pad_id),
            "labels": pad("labels", IGNORE_INDEX),
            "attention_mask": torch.zeros((len(items), n), dtype=torch.long),
            "pixel_values": torch.cat([it["pixel_values"] for it in items]),
            "image_grid_thw": torch.cat([it["image_grid_thw"] for it in items]),
        }
        for row, it in enumerate(items):
            batch["attention_mask"][row, : len(it["input_ids"])] = 1
        if "mm_token_type_ids" in items[0]:
            batch["mm_token_type_ids"] = pad("mm_token_type_ids", 0)
        return batch
