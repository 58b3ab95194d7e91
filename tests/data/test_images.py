from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import image_bytes, textured_image
from riskva_core.data import images
from riskva_core.data.images import EncodeSpec, ImagePathError, fit_size, inspect_image, resolve_image_path, to_rgb


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "value, reason",
    [
        ("", "image_path is empty"),
        ("   ", "image_path is empty"),
        ("../secret.jpg", "image_path escapes the dataset folder ('..')"),
        ("images/../../secret.jpg", "image_path escapes the dataset folder ('..')"),
        ("images\\..\\..\\secret.jpg", "image_path escapes the dataset folder ('..')"),
        ("/etc/passwd", "image_path is absolute; it must be relative to the dataset folder"),
        ("C:\\data\\a.jpg", "image_path is absolute; it must be relative to the dataset folder"),
        ("\\\\server\\share\\a.jpg", "image_path is absolute; it must be relative to the dataset folder"),
        ("http://example.com/a.jpg", "image_path is a URL; only paths inside the dataset folder are allowed"),
        ("file:///etc/passwd", "image_path is a URL; only paths inside the dataset folder are allowed"),
        ("s3://bucket/a.jpg", "image_path is a URL; only paths inside the dataset folder are allowed"),
    ],
)
def test_resolve_refuses_paths_leaving_the_root(tmp_path, value, reason):
    with pytest.raises(ImagePathError) as err:
        resolve_image_path(tmp_path, value)
    assert str(err.value) == reason


def test_resolve_accepts_relative_paths_inside_the_root(tmp_path):
    assert resolve_image_path(tmp_path, "images/a.jpg") == (tmp_path / "images" / "a.jpg").resolve()
    assert resolve_image_path(tmp_path, "./images//a.jpg") == (tmp_path / "images" / "a.jpg").resolve()
    assert resolve_image_path(tmp_path, " images/a.jpg ") == (tmp_path / "images" / "a.jpg").resolve()


def test_symlink_outside_root_is_refused_inside_is_fine(tmp_path):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(image_bytes(textured_image(0)))
    os.symlink(outside, root / "images" / "link.jpg")
    os.symlink(tmp_path, root / "up")  # a directory link: escape through a parent component
    (root / "images" / "real.jpg").write_bytes(outside.read_bytes())
    os.symlink(root / "images" / "real.jpg", root / "images" / "inner.jpg")
    for value in ("images/link.jpg", "up/outside.jpg"):
        with pytest.raises(ImagePathError, match=r"resolves outside the dataset folder \(symlink\)"):
            resolve_image_path(root, value)
    assert resolve_image_path(root, "images/inner.jpg") == (root / "images" / "real.jpg").resolve()


# --------------------------------------------------------------------------- checks


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_good_jpeg_passes_with_content_hash_of_file_bytes(tmp_path):
    data = image_bytes(textured_image(1, (80, 60)))
    rep = inspect_image(_write(tmp_path, "a.jpg", data))
    assert rep.ok and rep.warnings == []
    assert rep.format == "JPEG" and rep.size == (80, 60)
    import hashlib

    assert rep.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("zero.jpg", b"", "empty file (0 bytes)"),
        ("text.jpg", b"this is not an image at all", "not a recognised image file"),
    ],
)
def test_unreadable_files(tmp_path, name, data, reason):
    assert inspect_image(_write(tmp_path, name, data)).reasons == [reason]


def test_missing_file_and_directory(tmp_path):
    assert inspect_image(str(tmp_path / "nope.jpg")).reasons == ["image file not found"]
    assert inspect_image(str(tmp_path)).reasons == ["image path is not a regular file"]


@pytest.mark.parametrize("fmt, ext", [("JPEG", "jpg"), ("PNG", "png")])
def test_truncated_image_is_rejected(tmp_path, fmt, ext):
    data = image_bytes(textured_image(2, (200, 150)), fmt)
    path = _write(tmp_path, f"t.{ext}", data[: len(data) // 2])
    assert inspect_image(path).reasons == ["image data is truncated"]
    # Draft-mode decoding (prepare's fast path) must still see the truncation.
    spec = EncodeSpec((50, 50), 85, str(tmp_path / "enc"))
    assert inspect_image(path, encode=spec).reasons == ["image data is truncated"]
    assert not (tmp_path / "enc").exists()


def test_disallowed_format(tmp_path):
    data = image_bytes(textured_image(3).convert("P"), "GIF")
    rep = inspect_image(_write(tmp_path, "a.gif", data))
    assert rep.reasons == ["image format GIF is not allowed (allowed: BMP, JPEG, MPO, PNG, TIFF, WEBP)"]


def test_wrong_extension_is_accepted_with_a_warning(tmp_path):
    rep = inspect_image(_write(tmp_path, "really_jpeg.png", image_bytes(textured_image(4))))
    assert rep.ok
    assert rep.warnings == ["extension '.png' does not match its JPEG content; accepted"]


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp"), ("TIFF", "tiff")])
def test_allowed_formats(tmp_path, fmt, ext):
    rep = inspect_image(_write(tmp_path, f"a.{ext}", image_bytes(textured_image(5), fmt)))
    assert rep.ok and rep.format == fmt and rep.warnings == []


def test_pixel_limit_rejects_a_bomb_before_decoding(tmp_path):
    path = _write(tmp_path, "big.png", image_bytes(Image.new("L", (300, 200)), "PNG"))
    assert inspect_image(path, max_pixels=60_000).ok
    assert inspect_image(path, max_pixels=59_999).reasons == ["image is 300x200 = 60000 pixels, over the limit of 59999"]


def test_pillow_bomb_guard_stays_on():
    assert Image.MAX_IMAGE_PIXELS is not None
    assert images.DEFAULT_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS


def test_pillow_own_bomb_error_is_a_reason(tmp_path, monkeypatch):
    path = _write(tmp_path, "big.png", image_bytes(Image.new("L", (300, 200)), "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 60000 > 2 x limit: Pillow raises
    assert inspect_image(path).reasons == ["image exceeds Pillow's decompression-bomb limit"]


def test_tiny_image_warns_extreme_aspect_rejected(tmp_path):
    rep = inspect_image(_write(tmp_path, "one.png", image_bytes(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")))
    assert rep.ok and rep.warnings == ["image is only 1x1; the model upsamples it to 28 px"]
    rep = inspect_image(_write(tmp_path, "strip.png", image_bytes(Image.new("RGB", (402, 2)), "PNG")))
    assert rep.reasons == ["image is 402x2: aspect ratio over 200, which Qwen2.5-VL cannot take"]


# --------------------------------------------------------------------------- normalisation


def test_cmyk_to_rgb(tmp_path):
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # pure red in CMYK
    rgb = to_rgb(Image.open(io.BytesIO(image_bytes(cmyk, "JPEG", quality=95))))
    assert rgb.mode == "RGB"
    r, g, b = np.asarray(rgb).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 50 and b < 50


def test_sixteen_bit_scaled_to_eight_bit(tmp_path):
    arr = np.full((10, 12), 40000, dtype=np.uint16)
    arr[:, :6] = 65535
    img = Image.open(io.BytesIO(image_bytes(Image.fromarray(arr), "PNG")))
    assert img.mode == "I;16"
    out = np.asarray(to_rgb(img))
    assert out.dtype == np.uint8 and out.shape == (10, 12, 3)
    assert (out[:, :6] == 255).all() and (out[:, 6:] == 40000 >> 8).all()


def test_palette_with_alpha_composited_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0] + [0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0  # index 0 (red) fully transparent
    img = Image.open(io.BytesIO(image_bytes(img, "PNG", transparency=0)))
    out = to_rgb(img)
    assert out.getpixel((0, 0)) == (0, 0, 255)
    assert out.getpixel((3, 3)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_modes_composited_on_white(mode):
    img = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (0, 0, 0, 255))
    out = to_rgb(img.convert(mode))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 0)


def _rotated_jpeg() -> bytes:
    """60x40 stored pixels, left half red / right half blue, EXIF orientation 6 (rotate 90° CW)."""
    img = Image.new("RGB", (60, 40), (255, 0, 0))
    img.paste((0, 0, 255), (30, 0, 60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    return image_bytes(img, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_applied(tmp_path):
    path = _write(tmp_path, "rot.jpg", _rotated_jpeg())
    rep = inspect_image(path)
    assert rep.ok and rep.size == (40, 60)
    out = to_rgb(Image.open(path))
    assert out.size == (40, 60)
    top, bottom = np.asarray(out)[5, 20], np.asarray(out)[55, 20]
    assert top[0] > 200 and top[2] < 60  # the stored left (red) is displayed on top
    assert bottom[2] > 200 and bottom[0] < 60


# --------------------------------------------------------------------------- encoding


def test_fit_size_keeps_aspect_and_never_upscales():
    assert fit_size((4032, 3024), (1024, 1024)) == (1024, 768)
    assert fit_size((3024, 4032), (1024, 1024)) == (768, 1024)
    assert fit_size((500, 300), (1024, 1024)) == (500, 300)
    assert fit_size((2000, 100), (1024, 1024)) == (1024, 51)


def test_encode_fits_within_box_and_matches_full_decode(tmp_path):
    src = textured_image(7, (400, 300))
    path = _write(tmp_path, "a.jpg", image_bytes(src, "JPEG", quality=95))
    spec = EncodeSpec((128, 128), 90, str(tmp_path / "enc"))
    rep = inspect_image(path, encode=spec)
    assert rep.ok and rep.encoded_size == (128, 96)
    data = (tmp_path / "enc" / rep.encoded_name).read_bytes()
    import hashlib

    assert rep.encoded_name == hashlib.sha256(data).hexdigest()[:16] + ".jpg"
    got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
    # Reference without draft mode: full decode then the same resample.
    ref = np.asarray(Image.open(path).convert("RGB").resize((128, 96), images.RESAMPLE), dtype=np.float32)
    assert np.abs(got - ref).mean() < 3.0


def test_encode_is_deterministic_and_applies_exif(tmp_path):
    path = _write(tmp_path, "rot.jpg", _rotated_jpeg())
    reps = [inspect_image(path, encode=EncodeSpec((30, 30), 85, str(tmp_path / f"e{i}"))) for i in range(2)]
    assert reps[0].encoded_name == reps[1].encoded_name
    assert reps[0].encoded_size == (20, 30)  # portrait after orientation, fit in 30x30
    assert (tmp_path / "e0" / reps[0].encoded_name).read_bytes() == (tmp_path / "e1" / reps[1].encoded_name).read_bytes()


def test_small_images_are_not_upscaled(tmp_path):
    path = _write(tmp_path, "s.png", image_bytes(textured_image(8, (50, 40)), "PNG"))
    rep = inspect_image(path, encode=EncodeSpec((1024, 1024), 85, str(tmp_path / "enc")))
    assert rep.encoded_size == (50, 40)


def test_phone_mpo_jpeg_is_accepted_as_a_jpeg_and_its_first_frame_is_used(tmp_path):
    from image_fixtures import mpo

    photo = textured_image(6, (400, 300))
    path = _write(tmp_path, "phone.jpg", mpo(photo, quality=95))
    spec = EncodeSpec((200, 200), 90, str(tmp_path / "enc"))
    (tmp_path / "enc").mkdir()
    rep = inspect_image(path, encode=spec)
    assert rep.ok and rep.format == "MPO" and rep.warnings == []  # a .jpg name matches MPO content
    assert rep.size == (400, 300) and rep.encoded_size == (200, 150)  # the photo, not the small second frame
    with Image.open(tmp_path / "enc" / rep.encoded_name) as img:
        got = np.asarray(img.convert("RGB"), dtype=np.int16)
    want = np.asarray(photo.resize((200, 150), Image.Resampling.BICUBIC), dtype=np.int16)
    assert np.abs(got - want).mean() < 6  # same picture up to JPEG loss (the second frame is solid blue)
