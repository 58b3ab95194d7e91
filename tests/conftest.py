"""Shared fixtures: small hand-made raw datasets (CSV + Pillow images) for any step's tests.

    def test_x(make_raw_dataset):
        ds = make_raw_dataset(12)                       # 12 valid rows, levels cycling
        ds = make_raw_dataset([row(0), row(1, level="嚴重")], images={"images/extra.png": img})
        ds.csv_path, ds.root                            # --csv_path, --image_base_path
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pytest
from PIL import Image

from riskva_core.launch.commands import venv_first_path
from riskva_core.schema import LEVELS

@pytest.fixture(autouse=True, scope="session")
def _hermetic_data_root(tmp_path_factory):
    """Tests never read or write the checkout's data root: ``make test`` exports RISKVA_HOME and
    DAGSTER_HOME for the demo's ./riskva_home, and a test that fell back to them would both leak
    into the user's registry and see whatever models it holds. Each session gets its own."""
    home = tmp_path_factory.mktemp("riskva_home")
    saved = {k: os.environ.get(k) for k in ("RISKVA_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI",
                                             "MLFLOW_REGISTRY_URI", "RISKVA_MLFLOW_TRACKING_URI",
                                             "RISKVA_MLFLOW_REGISTRY_URI", "RISKVA_BASE_MODEL")}
    for key in saved:
        os.environ.pop(key, None)
    os.environ["RISKVA_HOME"] = str(home)
    os.environ["DAGSTER_HOME"] = str(home / "dagster_home")
    (home / "dagster_home").mkdir()
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# Under pytest-xdist the workers already fill the cores, so each worker and what it starts (servers,
# ranks, CLI commands) computes on one thread rather than each asking for every core. Measured on the
# AVX2 box, it did not lower the suite's CPU time (35.5 user-minutes with and without it); it keeps
# two workers from oversubscribing two cores, not more. A value the caller set is kept.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# The suite's processes find the venv's tools first, as in a shell with the venv activated (and as
# the local launcher gives its ranks): with the system's ninja for some launches and the venv's for
# others, DeepSpeed rebuilt its CPU shm op on every switch (riskva_core/launch/commands.py).
os.environ["PATH"] = venv_first_path()


# `make test` runs the suite on one pytest-xdist worker per core, a whole module per worker
# (--dist loadfile, so module fixtures are built once) and modules in collection order
# (--no-loadscope-reorder). The longest modules go first, so that the workers finish together
# instead of one starting the Ray test when the other is done; the Ray test, which mostly waits on
# its cluster, runs beside the real-width one, which computes. Seconds: `CI=true pytest -n 2 …` on a
# 2-core Xeon with AMX, 2026-12-07 (728 s in all). Only the order changes; a module missing from this
# list runs after them.
LONGEST_FIRST = (
    "tests/assets/test_ray_launcher.py",         # 171 s (50 s of CPU): Ray cluster in two namespaces
    "tests/model/test_real_width.py",            # 253 s: the 7B's widths: two trainings, merge, infer
    "tests/assets/test_ui.py",                   # 95 s: webserver, Chromium, a whole run
    "tests/model/test_benchmark_dry_runs.py",    # 126 s: the full-7B benchmark on the tiny model
    "tests/assets/test_resume.py",               # 48 s
    "tests/train/test_launch.py",                # 97 s
    "tests/test_readme.py",                      # 62 s
    "tests/assets/test_assets.py",               # 45 s
    "tests/train/test_train.py",                 # 76 s
    "tests/assets/test_lineage.py",              # 66 s
    "tests/assets/test_cancel.py",               # 48 s
    "tests/feedback/test_field_loop.py",         # 29 s (more on a first run): serve, Label Studio, Dagster
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: file order kept


def missing_requirement(message: str) -> None:
    """A test's system requirement (Chromium, PostgreSQL, root + iproute2) is absent: skip here, but
    FAIL under ``CI=true``, where `make test` installed it, so "tested" in CI always means "ran"."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: a missing requirement is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


RISKS = ("墙面开裂，存在渗水隐患", "钢筋外露，锈蚀加剧", "防水涂料透底，墙体易发霉", "模板支撑间距过大")
ADVICE = ("建议凿除松散部位后修补，并加强养护。", "建议除锈后补刷防锈漆，加厚保护层。", "建议透底处补刷防水涂料。", "建议按方案加密支撑。")
DESCRIPTIONS = ("墙面出现竖向裂缝，宽约2mm", "柱脚钢筋外露约10cm", "厨房墙面防水涂料透底", "顶板模板支撑立杆间距1.5m")


def textured_image(index: int, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    """A distinct, JPEG-friendly image per ``index``: smooth gradient plus a seeded pattern."""
    w, h = size
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    # Channels share one luminance pattern (like a photo): JPEG's chroma subsampling keeps it.
    wave = np.sin((xx + yy * (index % 5 + 1)) / (6.0 + index % 4)) + 0.5 * np.cos(yy / 11.0 + index)
    # A seeded smooth 8x8 field: different indices differ in structure, not only in tint, so they are
    # also different photos to a perceptual hash (data/groups.py: ~30 of 64 pHash bits apart, min 14).
    coarse = Image.fromarray(rng.uniform(0, 255, size=(8, 8)).astype(np.uint8), "L").resize((w, h), Image.Resampling.BICUBIC)
    blob = (np.asarray(coarse, np.float32) - 128) / 128
    arr = np.stack([base[c] + 20 * wave + 45 * blob for c in range(3)], axis=-1)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img if mode == "RGB" else img.convert(mode)


def image_bytes(img: Image.Image, fmt: str = "JPEG", **save_kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def row(index: int, level: str | None = None, image_path: str | None = None, **overrides: str) -> dict[str, str]:
    """One valid raw CSV row; keyword overrides may set any column (use data_xxx names)."""
    r = {
        "image_id": f"img{index:04d}",
        "image_path": image_path if image_path is not None else f"images/{index:04d}.jpg",
        "data_风险": RISKS[index % len(RISKS)],
        "data_纠正和预防建议": ADVICE[index % len(ADVICE)],
        "data_风险等级": level if level is not None else LEVELS[index % len(LEVELS)],
        "data_缺陷描述": f"{DESCRIPTIONS[index % len(DESCRIPTIONS)]}（样本{index}）",
    }
    r.update(overrides)
    return r


@dataclasses.dataclass
class RawDataset:
    root: Path  # --image_base_path
    csv_path: Path
    rows: list[dict[str, str]]


def write_csv(path: Path, rows: Sequence[Mapping[str, str]], encoding: str = "utf-8", columns: Sequence[str] | None = None) -> Path:
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: r.get(c, "") for c in columns})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


def build_raw_dataset(
    root: Path,
    rows: int | Sequence[Mapping[str, str]],
    images: Mapping[str, Image.Image | bytes | None] | None = None,
    encoding: str = "utf-8",
    columns: Sequence[str] | None = None,
    image_size: tuple[int, int] = (64, 48),
) -> RawDataset:
    """Write ``root/data.csv`` and the images its rows name.

    ``rows`` is a count (that many valid rows) or explicit row dicts. Every relative
    image_path gets a distinct textured JPEG unless ``images`` maps it to an image,
    raw bytes, or None (= do not create the file).
    """
    row_list = [row(i) for i in range(rows)] if isinstance(rows, int) else [dict(r) for r in rows]
    images = dict(images or {})
    root.mkdir(parents=True, exist_ok=True)
    paths = list(dict.fromkeys(r.get("image_path", "") for r in row_list))
    for index, rel in enumerate(paths):
        if rel in images or not rel or "://" in rel or rel.startswith("/") or ".." in rel:
            continue
        images[rel] = textured_image(index, image_size)
    for rel, content in images.items():
        if content is None:
            continue
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            fmt = {".png": "PNG", ".bmp": "BMP", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF", ".gif": "GIF"}.get(target.suffix.lower(), "JPEG")
            content.save(target, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    csv_path = write_csv(root / "data.csv", row_list, encoding=encoding, columns=columns)
    return RawDataset(root=root, csv_path=csv_path, rows=row_list)


@pytest.fixture
def make_raw_dataset(tmp_path: Path) -> Callable[..., RawDataset]:
    """``make_raw_dataset(rows, images=None, encoding="utf-8", columns=None, name="raw")``."""
    counter = iter(range(1_000_000))

    def make(rows: int | Sequence[Mapping[str, str]], name: str | None = None, **kwargs: Any) -> RawDataset:
        return build_raw_dataset(tmp_path / (name or f"raw{next(counter)}"), rows, **kwargs)

    return make


__all__ = ["RawDataset", "build_raw_dataset", "image_bytes", "row", "textured_image", "write_csv"]
