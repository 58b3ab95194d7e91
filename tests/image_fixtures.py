"""Photos as phones and attackers make them: EXIF-rotated twins and header-only pixel bombs."""
from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def exif6(img: Image.Image, quality: int = 92) -> bytes:
    """The same scene stored sideways with EXIF orientation 6, as phones write portrait photos."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h but holds almost no data: decoding it fails as truncated,
    so a refusal that names the pixel count proves the check ran on the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def mpo(img: Image.Image, quality: int = 92) -> bytes:
    """A phone JPEG with a second picture inside (MPF extension), as Pillow writes it: opens as ``MPO``.
    The second frame is a different picture, so a reader that took it would show."""
    buf = io.BytesIO()
    second = Image.new("RGB", (img.width // 4 or 1, img.height // 4 or 1), (0, 0, 255))
    img.save(buf, format="MPO", quality=quality, save_all=True, append_images=[second])
    return buf.getvalue()


def burst(img: Image.Image) -> list[tuple[str, bytes]]:
    """Four photos of one defect as inspectors' folders hold them: re-encoded, resized to 90 %,
    brightened 8 %, and cropped 3 % saved as PNG. Returns (extension, bytes) pairs."""
    from PIL import ImageEnhance

    img = img.convert("RGB")
    w, h = img.size

    def save(im: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    dx, dy = round(w * 0.015), round(h * 0.015)
    return [
        ("jpg", save(img, "JPEG", quality=75)),
        ("jpg", save(img.resize((round(w * 0.9), round(h * 0.9)), Image.Resampling.BICUBIC), "JPEG", quality=90)),
        ("jpg", save(ImageEnhance.Brightness(img).enhance(1.08), "JPEG", quality=90)),
        ("png", save(img.crop((dx, dy, w - dx, h - dy)), "PNG")),
    ]
