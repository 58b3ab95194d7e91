"""Summarise a prepared dataset: row counts, split and level distribution, a few rows, images.

Works on a single .jsonl/.parquet file (including the seed's legacy base64 Parquet) and on
a prepared folder. Parquet is read column-wise and only the first rows' images are
loaded, so previewing a multi-gigabyte file stays cheap.
"""
from __future__ import annotations

import argparse
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from . import atomic
from .errors import RiskvaError
from .samples import SPLITS, image_bytes_of, detect_format
from .schema import FIELD_LEVEL, FIELDS, LEVELS

ANSWER_CHARS = 80


def _sources(path: Path) -> list[tuple[str, Path]]:
    """(split name, file) pairs to summarise."""
    if path.is_file():
        detect_format(path)
        return [(path.stem, path)]
    fmt = detect_format(path)
    return [(s, path / f"{s}.{fmt}") for s in SPLITS if (path / f"{s}.{fmt}").exists()]


def _read_head(f: Path, n: int) -> tuple[int, Counter, list[dict[str, Any]]]:
    """(row count, level counts, the first ``n`` rows as dicts with ``image_bytes`` or ``image_file``)."""
    if f.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:
            raise RiskvaError(f"{f}: cannot read Parquet ({exc})") from None
        total = pf.metadata.num_rows
        levels: Counter = Counter()
        if FIELD_LEVEL in pf.schema_arrow.names:
            levels.update(str(v) for v in pf.read(columns=[FIELD_LEVEL]).column(FIELD_LEVEL).to_pylist())
        head: list[dict[str, Any]] = []
        if n > 0 and total:
            for batch in pf.iter_batches(batch_size=n):
                head = batch.to_pylist()[:n]
                break
        for i, row in enumerate(head):
            for key in ("messages", "extra"):
                if isinstance(row.get(key), str):
                    row[key] = json.loads(row[key])
            row["image_bytes"] = image_bytes_of(row.get("image"), f"{f} row {i}")
        return total, levels, head
    total, levels, head = 0, Counter(), []
    with f.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RiskvaError(f"{f}:{lineno}: malformed JSON ({exc.msg})") from None
            total += 1
            levels[str(row.get(FIELD_LEVEL, ""))] += 1
            if len(head) < n:
                image_file = (f.parent / str(row.get("image", ""))).resolve()
                if not image_file.is_relative_to(f.parent.resolve()):
                    raise RiskvaError(f"{f}:{lineno}: image path escapes {f.parent}")
                row["image_file"] = image_file
                head.append(row)
    return total, levels, head


def _answer(row: dict[str, Any]) -> str:
    for msg in reversed(row.get("messages") or []):
        if msg.get("role") == "assistant":
            content = msg.get("content")
            text = content if isinstance(content, str) else "".join(c.get("text", "") for c in content if c.get("type") == "text")
            text = text.replace("\n", " / ")
            return text if len(text) <= ANSWER_CHARS else text[:ANSWER_CHARS] + "…"
    return "(none)"


def _image_data(row: dict[str, Any]) -> bytes:
    if row.get("image_bytes") is not None:
        return row["image_bytes"]
    try:
        return Path(row["image_file"]).read_bytes()
    except OSError as exc:
        raise RiskvaError(f"cannot read image {row['image_file']}: {exc.strerror}") from None


def preview(path: str | Path, num_rows: int = 3, dump_images: str | Path | None = None, num_images: int = 4) -> str:
    """The preview text; with ``dump_images``, also write the first ``num_images`` images there."""
    p = Path(path)
    if not p.exists():
        raise RiskvaError(f"{p}: no such file or folder")
    sources = _sources(p)
    lines = [f"dataset: {p} ({detect_format(p)})"]
    info_file = p / "dataset_info.json" if p.is_dir() else None
    if info_file is not None and info_file.exists():
        info = json.loads(info_file.read_text(encoding="utf-8"))
        lines.append(f"schema v{info.get('schema_version')}, fingerprint {str(info.get('fingerprint'))[:16]}, seed {info.get('seed')}")
    wanted = max(num_rows, num_images if dump_images else 0)
    tables = [(split, *_read_head(f, wanted)) for split, f in sources]
    width = max([5] + [len(s) for s, *_ in tables])
    lines += ["", f"{'split':<{width}}  {'rows':>6}  " + "  ".join(f"{lvl:>4}" for lvl in LEVELS) + "  other"]
    grand: Counter = Counter()
    for split, total, levels, _ in tables:
        other = total - sum(levels[lvl] for lvl in LEVELS)
        lines.append(f"{split:<{width}}  {total:>6}  " + "  ".join(f"{levels[lvl]:>6}" for lvl in LEVELS) + f"  {other:>5}")
        grand.update(levels)
        grand["__total__"] += total
    if len(tables) > 1:
        other = grand["__total__"] - sum(grand[lvl] for lvl in LEVELS)
        lines.append(f"{'total':<{width}}  {grand['__total__']:>6}  " + "  ".join(f"{grand[lvl]:>6}" for lvl in LEVELS) + f"  {other:>5}")

    for split, total, _, head in tables:
        for i, row in enumerate(head[:num_rows]):
            lines += ["", f"[{split} {i + 1}/{total}] id {row.get('id', '-')}  image_id {row.get('image_id', '-')}  image_path {row.get('image_path', '-')}"]
            lines += [f"  {field}: {row.get(field, '')}" for field in FIELDS]
            if row.get("extra"):
                lines.append(f"  extra: {json.dumps(row['extra'], ensure_ascii=False, sort_keys=True)}")
            lines.append(f"  answer: {_answer(row)}")

    if dump_images:
        out = Path(dump_images)
        written = 0
        for split, _, _, head in tables:
            for i, row in enumerate(head[:num_images]):
                data = _image_data(row)
                try:
                    with Image.open(io.BytesIO(data)) as img:
                        ext = (img.format or "bin").lower().replace("jpeg", "jpg")
                except Exception:
                    raise RiskvaError(f"{split} row {i}: image bytes are not a readable image") from None
                atomic.write_bytes(out / f"{split}_{i:03d}_{row.get('id', i)}.{ext}", data)
                written += 1
        lines += ["", f"wrote {written} image(s) to {out}"]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="riskva preview", description="Summarise a prepared .jsonl/.parquet file or folder.")
    parser.add_argument("path", metavar="FILE", help="a prepared .jsonl or .parquet file, or a prepared folder")
    parser.add_argument("--num_rows", type=int, default=3, help="sample rows to print per split (default 3)")
    parser.add_argument("--dump_images", default=None, metavar="DIR", help="also write the first images of each split to DIR")
    parser.add_argument("--num_images", type=int, default=4, help="images per split to dump with --dump_images (default 4)")
    args = parser.parse_args(argv)
    if args.num_rows < 0 or args.num_images < 0:
        raise RiskvaError("--num_rows and --num_images must not be negative")
    print(preview(args.path, args.num_rows, args.dump_images, args.num_images))
    return 0
