"""What `riskva infer` reads: image files, image lists and prepared splits as ``Item``s.

An ``Item`` carries a reader, not bytes, so a long list is opened one image at a time and a bad
file becomes that image's error (run_items) instead of stopping the run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

from riskva_core.errors import RiskvaError
from riskva_core.schema import FIELDS


@dataclasses.dataclass
class Item:
    id: str
    image: str
    image_id: str
    image_path: str
    read: Callable[[], bytes]  # the encoded bytes; Generator.load_image turns them into pixels
    ground_truth: dict[str, str] | None = None
    group: str | None = None  # near-duplicate group recorded by prepare (split.json), for grouped intervals


def file_reader(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RiskvaError(f"cannot read image file ({exc.strerror or exc})") from None
        if not data:
            raise RiskvaError("empty image file (0 bytes)")
        return data

    return read


def image_items(paths: Sequence[str], base: Path | None) -> list[Item]:
    items, seen = [], {}
    for ref in paths:
        p = Path(ref)
        if base is not None and not p.is_absolute():
            p = base / p
        n = seen[ref] = seen.get(ref, 0) + 1
        items.append(Item(id=ref if n == 1 else f"{ref}#{n}", image=str(p), image_id=Path(ref).stem,
                          image_path=ref, read=file_reader(p)))
    return items


def read_image_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RiskvaError(f"--image_list {path}: cannot read ({exc})") from None
    refs = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not refs:
        raise RiskvaError(f"--image_list {path}: lists no images")
    return refs


def sample_items(dataset: Path, split: str) -> list[Item]:
    from riskva_core.data.groups import recorded_groups
    from riskva_core.data.samples import read_samples

    groups = recorded_groups(dataset)
    items = []
    for s in read_samples(dataset, split):
        items.append(Item(
            id=s.id,
            image=str(s.image_file) if s.image_file is not None else s.id,
            image_id=s.image_id,
            image_path=s.image_path,
            read=s.image_data,
            ground_truth={f: s.fields.get(f, "") for f in FIELDS},
            group=groups.get(s.id),
        ))
    if not items:
        raise RiskvaError(f"{dataset}: no samples in split {split!r}")
    return items
