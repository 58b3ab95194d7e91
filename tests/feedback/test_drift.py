from __future__ import annotations

import io

import pytest
from PIL import Image, ImageEnhance

from conftest import image_bytes, textured_image
from riskva_core.feedback.drift import (CHI2, FISHER, KS, Batch, DriftConfig, answer_tokens, compare_batches,
                                        describe, image_descriptors, outlying_photos, write_report)
from riskva_core.schema import LEVELS

N = 24


def batch(images: list[bytes], parse_ok: list[bool] | None = None, texts: list[str] | None = None) -> Batch:
    levels = [LEVELS[i % 3] for i in range(len(images))]
    texts = texts or [f"风险：墙面开裂，存在渗水隐患\n风险等级：{lvl}\n建议：凿除松散部位后修补" for lvl in levels]
    return Batch(images, levels, texts, parse_ok if parse_ok is not None else [True] * len(images))


def photos(start: int, size=(64, 48), darken: float | None = None, camera: str | None = None) -> list[bytes]:
    out = []
    for i in range(start, start + N):
        img = textured_image(i, size)
        if darken is not None:
            img = ImageEnhance.Brightness(img).enhance(darken)
        kwargs = {}
        if camera:
            exif = Image.Exif()
            exif[0x0110] = camera
            kwargs["exif"] = exif.tobytes()
        out.append(image_bytes(img, "JPEG", quality=92, **kwargs))
    return out


@pytest.fixture(scope="module")
def reference() -> Batch:
    return batch(photos(0))


def test_an_identical_batch_does_not_drift(reference):
    report = compare_batches(reference, batch(list(reference.images)))
    assert report.drifted == [] and all(t.p_value > 0.99 for t in report.tests)
    assert {t.test for t in report.tests} == {KS, CHI2, FISHER}
    assert report.corrected_alpha == pytest.approx(0.05 / len(report.tests)) and "Bonferroni" in report.correction


def test_other_photos_of_the_same_kind_do_not_drift(reference):
    assert compare_batches(reference, batch(photos(200))).drifted == []


def test_a_darkened_resized_batch_drifts_and_is_plotted(reference, tmp_path):
    current = batch(photos(100, size=(96, 72), darken=0.35))
    report = compare_batches(reference, current, DriftConfig(plot_dir=tmp_path))
    assert {"width", "height", "brightness"} <= set(report.drifted)
    assert FISHER not in {t.test for t in report.tests if t.drifted} and report.parse_rate_drop == 0
    width = next(t for t in report.tests if t.descriptor == "width")
    assert width.test == KS and width.statistic == 1.0 and width.p_value < report.corrected_alpha
    assert set(report.plots) == set(report.drifted)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in report.plots.values())
    flags = outlying_photos(describe(reference), describe(current), report.drifted)
    assert all(flags)  # every photo of today is outside the reference on size
    write_report(report, tmp_path)
    assert "| width | two-sample Kolmogorov-Smirnov |" in (tmp_path / "drift.md").read_text(encoding="utf-8")


def test_parse_failures_and_a_new_camera_drift(reference):
    current = batch(photos(200, camera="Phone X"), parse_ok=[i % 2 == 0 for i in range(N)])
    report = compare_batches(reference, current)
    assert {"camera_model", "parse_rate"} <= set(report.drifted)
    assert report.parse_rate_reference == 1.0 and report.parse_rate_drop == pytest.approx(0.5)
    camera = next(t for t in report.tests if t.descriptor == "camera_model")
    assert camera.test == CHI2 and "Phone X 100%" in camera.current


def test_descriptors_measure_what_they_say():
    flat = image_bytes(Image.new("RGB", (40, 30), (100, 100, 100)), "PNG")
    d = image_descriptors(flat)
    assert (d["width"], d["height"], d["brightness"], d["contrast"], d["sharpness"]) == (40, 30, 100, 0, 0)
    assert d["camera_model"] == "unknown"
    sharp = image_descriptors(image_bytes(textured_image(1, (64, 48)), "PNG"))["sharpness"]
    blurred = Image.open(io.BytesIO(image_bytes(textured_image(1, (64, 48)), "PNG"))).resize((16, 12)).resize((64, 48))
    assert image_descriptors(image_bytes(blurred, "PNG"))["sharpness"] < sharp
    assert answer_tokens("墙面开裂，存在渗水隐患") >= 3 and answer_tokens("") == 0


def test_a_day_without_photos_tests_nothing_and_a_misaligned_batch_is_refused(reference):
    assert compare_batches(reference, batch([])).tests == []
    with pytest.raises(ValueError, match="one entry per photo"):
        Batch([b"x"], [], [], None)
