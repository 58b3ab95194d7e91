"""Small prepared datasets and tiny models for tests of training, merging, inference, Dagster.

``make_prepared_dataset(dir, n)`` writes a prepared JSONL folder following the contract in
riskva_core/samples.py (train/val/test.jsonl, images/<sha256[:16]>.jpg, dataset_info.json),
with Pillow-drawn images whose defect (a dark stroke, its length set by the risk level)
is visible, so a model can in principle learn it. ``make_parquet_twin`` writes the same
samples as Parquet. ``make_tiny_model(dir, dataset_dir)`` builds the tiny Qwen2.5-VL.
All are deterministic for their arguments.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

from riskva_core.data.conversation import PromptTemplate, to_plain
from riskva_core.schema import FIELDS, LEVELS

_KINDS = (
    ("墙面裂缝", "墙体开裂影响结构耐久性", "建议对裂缝进行注浆修补并加强养护"),
    ("防水涂料透底", "厨房用水易溅入墙体造成墙体发霉", "建议透底处补刷防水涂料"),
    ("钢筋外露", "钢筋锈蚀降低承载力", "建议除锈后用高强砂浆封闭"),
)


def _image(i: int, level_idx: int, size: int) -> bytes:
    img = Image.new("RGB", (size, size), (200 - 10 * (i % 3), 200, 195))
    d = ImageDraw.Draw(img)
    length = size * (level_idx + 1) // 4
    y = size // 4 + (i * 7) % (size // 2)
    d.line([(size // 8, y), (size // 8 + length, y + (i % 5))], fill=(30, 30, 30), width=2 + level_idx * 2)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _rows(n: int, image_size: int) -> list[tuple[dict, bytes]]:
    rows = []
    for i in range(n):
        level_idx = i % len(LEVELS)
        kind, risk, advice = _KINDS[(i // len(LEVELS)) % len(_KINDS)]
        fields = {
            "风险": risk,
            "风险等级": LEVELS[level_idx],
            "纠正和预防建议": advice,
            "缺陷描述": f"{kind}，长度约{(level_idx + 1) * 10}厘米",
        }
        rows.append((fields, _image(i, level_idx, image_size)))
    return rows


def _split_of(i: int, n: int) -> str:
    # 6:2:2 cycle keeps every split non-empty for n >= 5 and balanced across levels.
    return ("train", "train", "train", "val", "test")[i % 5] if n >= 5 else "train"


def make_prepared_dataset(dir: str | Path, n: int = 20, image_size: int = 64) -> Path:
    """A prepared JSONL folder with ``n`` samples split train/val/test; returns the folder."""
    out = Path(dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    template = PromptTemplate()
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i, (fields, jpeg) in enumerate(_rows(n, image_size)):
        digest = hashlib.sha256(jpeg).hexdigest()[:16]
        rel = f"images/{digest}.jpg"
        (out / rel).write_bytes(jpeg)
        sample_id = hashlib.sha256(jpeg + json.dumps(fields, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]
        row = {
            "id": sample_id,
            "image_id": str(i),
            "image_path": f"raw/{i:04d}.jpg",
            "image": rel,
            "images": [str((out / rel).resolve())],
            "messages": to_plain(template.messages(None, fields)),
            **{f: fields[f] for f in FIELDS},
            "extra": {},
        }
        lines[_split_of(i, n)].append(json.dumps(row, ensure_ascii=False))
    for split, rows in lines.items():
        (out / f"{split}.jsonl").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    fingerprint = hashlib.sha256(
        b"".join((out / f"{s}.jsonl").read_bytes() for s in ("train", "val", "test"))
    ).hexdigest()
    (out / "dataset_info.json").write_text(json.dumps({
        "format": "jsonl",
        "counts": {s: len(v) for s, v in lines.items()},
        "fingerprint": fingerprint,
        "prompt_template": template.to_dict(),
    }, ensure_ascii=False, indent=2), encoding="utf-8")
    return out


def make_parquet_twin(jsonl_dir: str | Path, out_dir: str | Path) -> Path:
    """The same prepared samples as Parquet (image struct{bytes,path}, messages as a list)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, out = Path(jsonl_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        rows = []
        for line in (src / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            rows.append({
                **{k: r[k] for k in ("id", "image_id", "image_path", *FIELDS)},
                "image": {"bytes": (src / r["image"]).read_bytes(), "path": r["image"]},
                "messages": r["messages"],
                "extra": json.dumps(r.get("extra") or {}),
            })
        pq.write_table(pa.Table.from_pylist(rows), out / f"{split}.parquet")
    info = json.loads((src / "dataset_info.json").read_text(encoding="utf-8"))
    info["format"] = "parquet"
    (out / "dataset_info.json").write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")
    return out


def make_tiny_model(dir: str | Path, dataset_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Build the tiny random-weight Qwen2.5-VL folder at ``dir``; returns it."""
    from riskva_core.model.tiny import TinyModelConfig, build_tiny_model

    return build_tiny_model(TinyModelConfig(output_dir=Path(dir), dataset_path=Path(dataset_dir), size=size, seed=seed))


def make_hf_cache_snapshot(cache: str | Path, hub_id: str, commit: str, model_dir: str | Path,
                           monkeypatch=None) -> Path:
    """Copy ``model_dir`` into a Hugging Face cache laid out as a download leaves it
    (``models--OWNER--NAME/snapshots/COMMIT``, ``refs/main`` naming COMMIT); returns the snapshot folder.
    With ``monkeypatch``, this process reads that cache offline (as HF_HUB_CACHE/HF_HUB_OFFLINE would)."""
    import shutil

    repo = Path(cache) / ("models--" + hub_id.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    if monkeypatch is not None:
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / commit
