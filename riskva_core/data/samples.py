"""One reader API over prepared JSONL and Parquet: both yield identical ``Sample`` objects.

Prepared folder contract (written by ``riskva prepare``):

    OUT/train.jsonl | OUT/train.parquet   (and val, test)
    OUT/images/<sha256[:16]>.jpg          JSONL only: the normalised JPEG, referenced relative to OUT
    OUT/split.json                        source row -> split
    OUT/dataset_info.json                 format, counts, fingerprint, prepare config, prompt template
    OUT/validation_report.json|.md

JSONL line / Parquet row columns:
    id            stable sample id (content hash of image + fields)
    image_id      source CSV image_id
    image_path    source CSV image_path (relative to the raw dataset root)
    image         JSONL: path relative to OUT (what RisKVA reads); Parquet: struct{bytes: binary,
                  path: string} (the Hugging Face ``datasets`` Image layout); legacy base64 accepted
    images        JSONL only: [absolute path of the same file], the column ms-swift and
                  LLaMA-Factory read (ms-swift resolves image paths from its working folder only)
    messages      the conversation as [{role, content: str}], the image as an ``<image>`` tag
                  (conversation.to_plain); Parquet: list<struct<role, content>>. Samples carry it
                  back as content lists (conversation.from_plain); schema 1's forms still read
    风险, 风险等级, 纠正和预防建议, 缺陷描述   ground truth as plain columns
    extra         JSON object of pass-through CSV columns (Parquet: JSON string)

JSONL and Parquet carry the same JPEG bytes, so both give the same pixels and the same batch.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import io
import json
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from riskva_core.data.conversation import from_plain
from riskva_core.errors import RiskvaError
from riskva_core.schema import FIELDS

SPLITS: tuple[str, ...] = ("train", "val", "test")
FORMATS: tuple[str, ...] = ("jsonl", "parquet")
# 2: plain-string messages with <image> tags, JSONL `images` column, Parquet messages as a list.
SCHEMA_VERSION = 2


@dataclasses.dataclass(frozen=True)
class ParquetImage:
    """Where one Parquet row's image is: read on demand, so a training dataset (on every rank and
    DataLoader worker) holds row positions instead of every image's bytes."""

    path: Path
    row_group: int
    row: int  # within the row group

    def read(self, where: str) -> bytes:
        group = _row_group_images(self.path, self.row_group)
        return _image_bytes(group[self.row].as_py(), where)


@functools.lru_cache(maxsize=2)
def _row_group_images(path: Path, row_group: int):
    """One row group's image column, kept while its rows are read (sequential passes read each
    group once; a shuffled epoch re-reads a group, ``--row_group_size`` rows, per sample)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(row_group, columns=["image"]).column("image")


@dataclasses.dataclass(frozen=True)
class Sample:
    id: str
    image_id: str
    image_path: str
    fields: dict[str, str]
    messages: list[dict]
    image_bytes: bytes | None = None
    image_file: Path | None = None
    split: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    image_ref: ParquetImage | None = None  # lazy Parquet image (read_samples(..., lazy_images=True))

    def image_data(self) -> bytes:
        """The stored (encoded) image bytes, from the Parquet column or the JSONL image file."""
        if self.image_bytes is not None:
            return self.image_bytes
        if self.image_ref is not None:
            return self.image_ref.read(f"{self.image_ref.path} row group {self.image_ref.row_group} "
                                       f"row {self.image_ref.row} (sample {self.id})")
        if self.image_file is not None:
            try:
                return self.image_file.read_bytes()
            except OSError as exc:
                raise RiskvaError(f"sample {self.id}: cannot read image {self.image_file}: {exc.strerror}") from None
        raise RiskvaError(f"sample {self.id}: has no image")

    def load_image(self) -> Image.Image:
        name = str(self.image_file) if self.image_bytes is None and self.image_file is not None else self.id
        return decode_image(self.image_data(), name)

    @property
    def answer(self) -> str | None:
        """The assistant's answer text, or None for a prompt-only sample."""
        last = self.messages[-1] if self.messages else None
        if not last or last.get("role") != "assistant":
            return None
        content = last["content"]
        if isinstance(content, str):
            return content
        return "".join(c.get("text", "") for c in content if c.get("type") == "text")

    def prompt_messages(self) -> list[dict]:
        """The conversation without the answer: what the model sees at inference."""
        return [m for m in self.messages if m.get("role") != "assistant"]


def decode_image(data: bytes, name: str) -> Image.Image:
    """Fully decode image bytes to RGB; Pillow's decompression-bomb guard stays on."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Image.DecompressionBombError:
        raise RiskvaError(f"{name}: image exceeds the pixel limit") from None
    except Exception as exc:  # PIL raises many types for corrupt data
        raise RiskvaError(f"{name}: cannot decode image ({exc})") from None
    return img if img.mode == "RGB" else img.convert("RGB")


def detect_format(dataset_path: str | Path) -> str:
    """'jsonl' or 'parquet' for a prepared folder or a single file."""
    p = Path(dataset_path)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in {".jsonl", ".json"}:
            return "jsonl"
        if suffix == ".parquet":
            return "parquet"
        raise RiskvaError(f"{p}: not a .jsonl or .parquet file")
    if not p.is_dir():
        raise RiskvaError(f"{p}: no such dataset file or folder")
    found = [fmt for fmt in FORMATS if any((p / f"{s}.{fmt}").exists() for s in SPLITS)]
    if len(found) != 1:
        raise RiskvaError(
            f"{p}: expected a prepared folder with train/val/test .jsonl or .parquet files, found "
            + (" and ".join(found) if found else "none")
        )
    return found[0]


def split_file(dataset_path: str | Path, split: str) -> Path:
    p = Path(dataset_path)
    if p.is_file():
        return p
    fmt = detect_format(p)
    f = p / f"{split}.{fmt}"
    if not f.exists():
        raise RiskvaError(f"{p}: no {split}.{fmt} in the prepared folder")
    return f


def iter_samples(dataset_path: str | Path, split: str = "train", lazy_images: bool = False) -> Iterator[Sample]:
    """Stream the samples of one split (or of a single .jsonl/.parquet file) in file order.

    Parquet is read a row group at a time, so a preview of a multi-gigabyte file stays cheap.
    ``lazy_images``: Parquet samples carry an ``image_ref`` instead of their bytes (JSONL samples
    always read their image file on demand).
    """
    f = split_file(dataset_path, split)
    split_name = f.stem if f.stem in SPLITS else None
    if detect_format(f) == "jsonl":
        return _read_jsonl(f, split_name)
    return _read_parquet(f, split_name, lazy_images)


def read_samples(dataset_path: str | Path, split: str = "train", lazy_images: bool = False) -> list[Sample]:
    """All samples of one split of a prepared folder, or of a single .jsonl/.parquet file."""
    return list(iter_samples(dataset_path, split, lazy_images))


def _fields(row: dict[str, Any]) -> dict[str, str]:
    return {k: ("" if row.get(k) is None else str(row.get(k))) for k in FIELDS}


def _read_jsonl(path: Path, split: str | None) -> Iterator[Sample]:
    root = path.parent.resolve()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image_ref = row["image"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise RiskvaError(f"{path}:{lineno}: malformed sample ({exc})") from None
            image_file = (root / image_ref).resolve()
            if not image_file.is_relative_to(root):
                raise RiskvaError(f"{path}:{lineno}: image path {image_ref!r} escapes {root}")
            yield Sample(
                id=str(row.get("id", lineno)),
                image_id=str(row.get("image_id", "")),
                image_path=str(row.get("image_path", image_ref)),
                fields=_fields(row),
                messages=from_plain(row.get("messages") or []),
                image_file=image_file,
                split=split,
                extra=row.get("extra") or {},
            )


def _image_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):  # legacy seed format: base64 text
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RiskvaError(f"{where}: image column is neither bytes nor base64") from None
    raise RiskvaError(f"{where}: image column has no bytes")


def _parquet_rows(pf, path: Path, lazy_images: bool) -> Iterator[dict[str, Any]]:
    """Rows a row group at a time; lazily, without the image column and with its position."""
    columns = [c for c in pf.schema_arrow.names if c != "image"] if lazy_images else None
    for g in range(pf.num_row_groups):
        for j, row in enumerate(pf.read_row_group(g, columns=columns).to_pylist()):
            if lazy_images:
                row["image"] = ParquetImage(path, g, j)
            yield row


def _read_parquet(path: Path, split: str | None, lazy_images: bool = False) -> Iterator[Sample]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise RiskvaError(f"{path}: cannot read Parquet ({exc})") from None
    if "image" not in pf.schema_arrow.names:
        raise RiskvaError(f"{path}: no 'image' column")
    for i, row in enumerate(_parquet_rows(pf, path.resolve(), lazy_images)):
        where = f"{path} row {i}"
        lazy = row["image"] if lazy_images else None
        messages = row.get("messages")
        if isinstance(messages, str):
            messages = json.loads(messages)
        extra = row.get("extra")
        if isinstance(extra, str):
            extra = json.loads(extra)
        yield Sample(
            id=str(row.get("id", i)),
            image_id=str(row.get("image_id", "")),
            image_path=str(row.get("image_path", "")),
            fields=_fields(row),
            messages=from_plain(messages or []),
            image_bytes=None if lazy else _image_bytes(row["image"], where),
            split=split,
            extra=extra or {},
            image_ref=lazy,
        )
