"""Summarise a prepared dataset: row counts, split and level distribution, a few rows, images.

Works on a single .jsonl/.parquet file (including the seed's legacy base64 Parquet) and on
a prepared folder. Parquet is read column-wise and only the first rows' images are
loaded, so previewing a multi-gigabyte file stays cheap.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
from collections import Counter
from pathlib import Path
from PIL import Image

from riskva_core import atomic
from riskva_core.errors import RiskvaError
from riskva_core.data.samples import SPLITS, Sample, detect_format, iter_samples
from riskva_core.schema import FIELD_LEVEL, FIELDS, LEVELS

ANSWER_CHARS = 80


def _sources(path: Path) -> list[tuple[str, Path]]:
    """(split name, file) pairs to summarise."""
    if path.is_file():
        detect_format(path)
        return [(path.stem, path)]
    fmt = detect_format(path)
    return [(s, path / f"{s}.{fmt}") for s in SPLITS if (path / f"{s}.{fmt}").exists()]


def _read_head(f: Path, n: int) -> tuple[int, Counter, list[Sample]]:
    """(row count, level counts, the first ``n`` samples) of one file, through the shared reader."""
    samples = iter_samples(f)
    head = list(itertools.islice(samples, n))
    if f.suffix.lower() != ".parquet":
        levels = Counter(s.fields[FIELD_LEVEL] for s in head)
        total = len(head)
        for sample in samples:  # JSONL rows are cheap: the images stay on disk
            levels[sample.fields[FIELD_LEVEL]] += 1
            total += 1
        return total, levels, head
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)  # counts from the footer and one column, never the image bytes
    levels = Counter()
    if FIELD_LEVEL in pf.schema_arrow.names:
        levels.update(str(v) for v in pf.read(columns=[FIELD_LEVEL]).column(FIELD_LEVEL).to_pylist())
    return pf.metadata.num_rows, levels, head


def _answer(sample: Sample) -> str:
    text = sample.answer
    if text is None:
        return "(none)"
    text = text.replace("\n", " / ")
    return text if len(text) <= ANSWER_CHARS else text[:ANSWER_CHARS] + "…"


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
        for i, sample in enumerate(head[:num_rows]):
            lines += ["", f"[{split} {i + 1}/{total}] id {sample.id}  image_id {sample.image_id or '-'}  image_path {sample.image_path or '-'}"]
            lines += [f"  {field}: {sample.fields.get(field, '')}" for field in FIELDS]
            if sample.extra:
                lines.append(f"  extra: {json.dumps(sample.extra, ensure_ascii=False, sort_keys=True)}")
            lines.append(f"  answer: {_answer(sample)}")

    if dump_images:
        out = Path(dump_images)
        written = 0
        for split, _, _, head in tables:
            for i, sample in enumerate(head[:num_images]):
                data = sample.image_data()
                try:
                    with Image.open(io.BytesIO(data)) as img:
                        ext = (img.format or "bin").lower().replace("jpeg", "jpg")
                except Exception:
                    raise RiskvaError(f"{split} row {i}: image bytes are not a readable image") from None
                atomic.write_bytes(out / f"{split}_{i:03d}_{sample.id}.{ext}", data)
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
