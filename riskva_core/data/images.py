"""Image safety and normalisation: confined paths, full decode checks, RGB, resize, JPEG.

Every raw image goes through ``inspect_image`` exactly once, in a worker process.
Validation only needs the checks; ``prepare`` also passes an ``EncodeSpec`` so the
same decode produces the normalised training JPEG (a 12-megapixel photo is never
decoded twice, and JPEG draft mode lets libjpeg decode it at 1/2, 1/4 or 1/8 scale).

Decisions worth knowing:
- Content hash (``ImageReport.sha256``) is the sha256 of the *file bytes*. It is cheap,
  independent of decode settings, and catches the common case: the same photo copied
  under two names. Re-encoded, resized or cropped copies are caught by the perceptual hash
  (``ImageReport.phash``, data/groups.py), computed from the same decode: it adds no decode.
- Phone JPEGs with a second picture inside (the MPF extension: depth maps, previews) open
  in Pillow as format ``MPO``; they are JPEGs and are accepted everywhere, the first frame
  (the photo itself) is used.
- A file whose extension disagrees with its content (``a.png`` holding a JPEG) is accepted
  when the content is an allowed format and decodes fully; a warning is recorded.
- Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) stays on; our
  ``max_pixels`` limit is checked from the header before any pixel is decoded.
- Truncated data is an error: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never enabled.
  JPEG draft mode still entropy-decodes the whole scan, so truncation is still caught.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from riskva_core import atomic
from riskva_core.data.groups import perceptual_hash

ALLOWED_FORMATS: tuple[str, ...] = ("BMP", "JPEG", "MPO", "PNG", "TIFF", "WEBP")
# Formats libjpeg decodes: draft-mode scaling applies and a ``.jpg`` name matches them.
JPEG_FORMATS: frozenset[str] = frozenset({"JPEG", "MPO"})
EXTENSION_FORMATS: dict[str, str] = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
DEFAULT_MAX_IMAGE_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485
MIN_IMAGE_SIDE = 28  # one Qwen2.5-VL patch-merge cell; smaller images are upsampled by the processor
MAX_ASPECT_RATIO = 200  # Qwen2.5-VL's smart_resize refuses anything more elongated
# Bicubic (antialiased by Pillow's convolution resize): what Qwen2.5-VL's own image processor
# uses, and ~1.5x faster than Lanczos on the 2016x1512 -> 1024x768 step of a phone photo.
RESAMPLE = Image.Resampling.BICUBIC
WHITE = (255, 255, 255)
# Validation without encoding still decodes every pixel (truncation is caught) but fits the
# picture within prepare's default box for the perceptual hash: the same hash as prepare's.
HASH_BOX = (1024, 1024)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# EXIF orientations 5-8 rotate by 90°, so width and height swap on display.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


class ImagePathError(ValueError):
    """An image_path that must not be opened; ``str(err)`` is the reject reason."""


def resolve_image_path(root: str | os.PathLike, image_path: str) -> Path:
    """Absolute path of ``image_path`` under ``root``, refusing anything that leaves it.

    Refused: empty values, URLs, absolute paths (POSIX, Windows drive or UNC),
    ``..`` components, and symlinks (anywhere on the path) resolving outside ``root``.
    """
    value = image_path.strip()
    if not value:
        raise ImagePathError("image_path is empty")
    if _URL.match(value):
        raise ImagePathError("image_path is a URL; only paths inside the dataset folder are allowed")
    if "\x00" in value:
        raise ImagePathError("image_path contains a NUL character")
    win = PureWindowsPath(value)
    if PurePosixPath(value).is_absolute() or win.drive or win.root:
        raise ImagePathError("image_path is absolute; it must be relative to the dataset folder")
    parts = re.split(r"[\\/]+", value)
    if ".." in parts:
        raise ImagePathError("image_path escapes the dataset folder ('..')")
    base = Path(root).resolve()
    resolved = (base / Path(*[p for p in parts if p not in ("", ".")])).resolve()
    if not resolved.is_relative_to(base):
        raise ImagePathError("image_path resolves outside the dataset folder (symlink)")
    return resolved


@dataclasses.dataclass(frozen=True)
class EncodeSpec:
    """How ``prepare`` wants each image: fit within ``max_size``, JPEG ``quality``, into ``out_dir``."""

    max_size: tuple[int, int]
    quality: int
    out_dir: str


@dataclasses.dataclass
class ImageReport:
    reasons: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    sha256: str | None = None  # of the source file bytes
    format: str | None = None
    size: tuple[int, int] | None = None  # source size as displayed (after EXIF orientation)
    mode: str | None = None
    encoded_name: str | None = None  # "<sha256[:16]>.jpg" in EncodeSpec.out_dir
    encoded_sha256: str | None = None
    encoded_size: tuple[int, int] | None = None
    phash: str | None = None  # perceptual hash (data/groups.py) of the decoded image

    @property
    def ok(self) -> bool:
        return not self.reasons


def fit_size(size: tuple[int, int], max_size: tuple[int, int]) -> tuple[int, int]:
    """Largest size within ``max_size`` keeping the aspect ratio; never upscales."""
    w, h = size
    scale = min(max_size[0] / w, max_size[1] / h, 1.0)
    if scale >= 1.0:
        return w, h
    return max(1, round(w * scale)), max(1, round(h * scale))


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied, then 8-bit RGB; transparency is composited on white."""
    if orientation(img) != 1:  # exif_transpose copies even when there is nothing to do
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit samples (0..65535): keep the top 8 bits, a plain linear rescale.
        arr = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.nan_to_num(np.asarray(img, dtype=np.float64)), 0, 255)
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def decode_fitted(img: Image.Image, max_size: tuple[int, int] | None) -> Image.Image:
    """Decode an opened image to RGB, EXIF-oriented, fitted within ``max_size`` (None: as is).

    The one decode path of ``prepare`` (then JPEG-encoded) and of the model's image policy
    (data/image_policy.py, then JPEG round-tripped), so served pixels equal prepared ones.
    """
    orient = orientation(img)
    size = _oriented(img.size, orient)
    target = fit_size(size, max_size) if max_size is not None else size
    if img.format in JPEG_FORMATS and target != size:
        # libjpeg's DCT scaling: decode at the smallest 1/2^k scale still >= target.
        img.draft(img.mode, _oriented(target, orient))
    img.load()
    rgb = to_rgb(img)
    return rgb if rgb.size == target else rgb.resize(target, RESAMPLE)


def decode_jpeg(data: bytes) -> Image.Image:
    """Decode JPEG bytes this module wrote (trusted: sizes are already checked)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Fixed encoder settings (no EXIF, baseline, 4:2:0, optimised Huffman): deterministic bytes."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=2, optimize=True, progressive=False)
    return buf.getvalue()


def _oriented(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in _SWAPPING_ORIENTATIONS else size


def orientation(img: Image.Image) -> int:
    """EXIF orientation tag (1 = upright; 1 also for a missing or malformed tag)."""
    try:
        value = img.getexif().get(0x0112, 1)
        return int(value) if value else 1
    except Exception:  # a malformed EXIF block must not hide the image itself
        return 1


def _decode_reason(exc: BaseException) -> str:
    text = str(exc)
    if "truncated" in text.lower():
        return "image data is truncated"
    return f"corrupt image data ({type(exc).__name__}: {text})" if text else f"corrupt image data ({type(exc).__name__})"


def inspect_image(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, encode: EncodeSpec | None = None) -> ImageReport:
    """Check one image (exists, non-empty, allowed format, under the pixel limit, decodes fully).

    With ``encode``, also write its normalised, resized JPEG into ``encode.out_dir``.
    Never raises for bad images: problems come back as ``reasons``.
    """
    rep = ImageReport()
    p = Path(path)
    try:
        if not p.exists():
            rep.reasons.append("image file not found")
            return rep
        if not p.is_file():
            rep.reasons.append("image path is not a regular file")
            return rep
        data = p.read_bytes()
    except OSError as exc:
        rep.reasons.append(f"cannot read image file ({exc.strerror or exc})")
        return rep
    if not data:
        rep.reasons.append("empty file (0 bytes)")
        return rep
    rep.sha256 = hashlib.sha256(data).hexdigest()

    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        rep.reasons.append("image exceeds Pillow's decompression-bomb limit")
        return rep
    except UnidentifiedImageError:
        rep.reasons.append("not a recognised image file")
        return rep
    except Exception as exc:
        rep.reasons.append(_decode_reason(exc))
        return rep

    with img:
        rep.format = img.format
        rep.mode = img.mode
        if img.format not in ALLOWED_FORMATS:
            rep.reasons.append(f"image format {img.format} is not allowed (allowed: {', '.join(ALLOWED_FORMATS)})")
            return rep
        w, h = img.size
        if w * h > max_pixels:
            rep.reasons.append(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
            return rep
        if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
            rep.reasons.append(f"image is {w}x{h}: aspect ratio over {MAX_ASPECT_RATIO}, which Qwen2.5-VL cannot take")
            return rep
        if min(w, h) < MIN_IMAGE_SIDE:
            rep.warnings.append(f"image is only {w}x{h}; the model upsamples it to {MIN_IMAGE_SIDE} px")
        ext = p.suffix.lower()
        expected = EXTENSION_FORMATS.get(ext)
        if expected != img.format and not (expected == "JPEG" and img.format in JPEG_FORMATS):
            rep.warnings.append(f"extension '{ext or '(none)'}' does not match its {img.format} content; accepted")
        rep.size = _oriented((w, h), orientation(img))
        try:
            rgb = decode_fitted(img, encode.max_size if encode else HASH_BOX)
            rep.phash = perceptual_hash(rgb)
        except Image.DecompressionBombError:
            rep.reasons.append("image exceeds Pillow's decompression-bomb limit")
            return rep
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for bad data
            rep.reasons.append(_decode_reason(exc))
            return rep

    if encode is None:
        return rep
    jpeg = encode_jpeg(rgb, encode.quality)
    rep.encoded_sha256 = hashlib.sha256(jpeg).hexdigest()
    rep.encoded_name = f"{rep.encoded_sha256[:16]}.jpg"
    rep.encoded_size = rgb.size
    dest = Path(encode.out_dir) / rep.encoded_name
    if not dest.exists():  # content-addressed: an existing file already holds these bytes
        atomic.write_bytes(dest, jpeg)
    return rep
