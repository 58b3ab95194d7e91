"""The model's image policy: how any photo becomes the pixels the model was trained on.

A model trained on a prepared folder only ever saw ``riskva prepare``'s output: the photo
EXIF-transposed, made RGB, fitted within ``--max_image_size`` (bicubic, draft-mode JPEG
decode) and stored as a JPEG at ``--image_quality``. Serving a raw phone photo without the
same steps gives the model different pixels (and, under the 7B pixel budget, a different
number of image tokens: 1230 for a 4032x3024 photo against 999 for its 1024x768 copy).

``ImagePolicy`` is that recipe as data, saved as ``image_policy.json`` next to the processor
by training (train/outputs.py, from the prepared folder's dataset_info.json), carried by the
merge (model/merge.py) and so registered inside the pyfunc's ``model_dir``. ``apply`` is the
one function ``riskva infer``, the pyfunc (MLflow and OpenAI servers) and evaluation call:

1. read the header only (Pillow opens lazily) and refuse, before any pixel is decoded, an
   image over ``max_decoded_pixels`` (default 40 MP) or with an unusable format/aspect ratio;
2. an upright RGB JPEG already within ``max_size`` is used as decoded: that is what every
   prepared copy is, so evaluation on prepared data sees exactly the pixels training saw
   (re-encoding it would add a second generation of JPEG loss);
3. anything else goes through ``images.decode_fitted`` (the same code ``prepare`` runs) and a
   JPEG round trip at ``jpeg_quality``, giving bit-identical pixels to the prepared copy.

The exception this leaves: a raw JPEG that is upright and already within ``max_size`` is
served as is, while ``prepare`` would have re-encoded it once; the two differ by one JPEG
generation at ``jpeg_quality``. The processor saved in the same folder then applies the
pixel budget (``min_pixels``/``max_pixels``, Qwen's smart_resize), as in training.

A model folder without ``image_policy.json`` (a base model, a model trained before this
file existed) gets the default: EXIF transpose, RGB, the pixel limit, no cap, no round trip.
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from riskva_core.atomic import write_json
from riskva_core.data.images import (
    ALLOWED_FORMATS,
    MAX_ASPECT_RATIO,
    MIN_IMAGE_SIDE,
    decode_fitted,
    decode_jpeg,
    encode_jpeg,
    orientation,
)
from riskva_core.errors import RiskvaError

IMAGE_POLICY_FILE = "image_policy.json"
DEFAULT_MAX_DECODED_PIXELS = 40_000_000  # a 48 MP phone sensor bins to 12 MP; 40 MP is ~120 MB of RGB
POLICY_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """``max_size`` and ``jpeg_quality`` come from ``riskva prepare`` (None: not capped /
    no JPEG round trip); ``max_decoded_pixels`` is a serving limit, overridable per server."""

    max_size: tuple[int, int] | None = None
    jpeg_quality: int | None = None
    max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS

    def __post_init__(self) -> None:
        if self.max_size is not None:
            size = tuple(int(v) for v in self.max_size)
            if len(size) != 2 or min(size) < MIN_IMAGE_SIDE:
                raise RiskvaError(f"image policy: max_size needs two sizes >= {MIN_IMAGE_SIDE}, got {list(size)}")
            object.__setattr__(self, "max_size", size)
        if self.jpeg_quality is not None and not 1 <= int(self.jpeg_quality) <= 100:
            raise RiskvaError(f"image policy: jpeg_quality must be within 1..100, got {self.jpeg_quality}")
        if int(self.max_decoded_pixels) < MIN_IMAGE_SIDE * MIN_IMAGE_SIDE:
            raise RiskvaError(f"max_decoded_pixels must be >= {MIN_IMAGE_SIDE * MIN_IMAGE_SIDE}, "
                              f"got {self.max_decoded_pixels}")

    # ------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        return {"version": POLICY_VERSION, "exif_transpose": True, "mode": "RGB", "resample": "bicubic",
                "max_size": list(self.max_size) if self.max_size else None,
                "jpeg_quality": self.jpeg_quality, "max_decoded_pixels": int(self.max_decoded_pixels)}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / IMAGE_POLICY_FILE
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, *folders: str | Path | None) -> "ImagePolicy":
        """The policy saved in the first folder that has one, else the default policy."""
        for folder in folders:
            path = Path(folder) / IMAGE_POLICY_FILE if folder is not None else None
            if path is not None and path.is_file():
                try:
                    d = json.loads(path.read_text(encoding="utf-8"))
                    return cls(max_size=tuple(d["max_size"]) if d.get("max_size") else None,
                               jpeg_quality=d.get("jpeg_quality"),
                               max_decoded_pixels=int(d.get("max_decoded_pixels", DEFAULT_MAX_DECODED_PIXELS)))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise RiskvaError(f"{path}: unreadable image policy ({exc})") from None
        return cls()

    @classmethod
    def from_prepared(cls, dataset_path: str | Path) -> "ImagePolicy":
        """The policy ``riskva prepare`` applied to a prepared folder (its dataset_info.json)."""
        folder = Path(dataset_path)
        info_file = (folder if folder.is_dir() else folder.parent) / "dataset_info.json"
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return cls()
        image = info.get("image") or {}
        config = info.get("prepare_config") or {}
        size = image.get("max_size") or config.get("max_image_size")
        quality = image.get("quality") or config.get("image_quality")
        return cls(max_size=tuple(size) if size else None, jpeg_quality=int(quality) if quality else None)

    def with_limit(self, max_decoded_pixels: int | None) -> "ImagePolicy":
        if max_decoded_pixels is None:
            return self
        return dataclasses.replace(self, max_decoded_pixels=int(max_decoded_pixels))

    # ------------------------------------------------------------ the function

    def apply(self, data: bytes, name: str) -> Image.Image:
        """Image bytes → the RGB image the model takes; ``RiskvaError`` naming ``name`` if unusable."""
        if not data:
            raise RiskvaError(f"{name}: empty image (0 bytes)")
        try:
            img = Image.open(io.BytesIO(data))  # header only: no pixel is decoded yet
        except Image.DecompressionBombError:
            raise RiskvaError(f"{name}: image exceeds Pillow's decompression-bomb limit") from None
        except UnidentifiedImageError:
            raise RiskvaError(f"{name}: not a recognised image file") from None
        except Exception as exc:
            raise RiskvaError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from None
        with img:
            if img.format not in ALLOWED_FORMATS:
                raise RiskvaError(f"{name}: image format {img.format} is not allowed "
                                  f"(allowed: {', '.join(ALLOWED_FORMATS)})")
            w, h = img.size
            if w * h > self.max_decoded_pixels:
                raise RiskvaError(f"{name}: image is {w}x{h} = {w * h} pixels, over the limit of "
                                  f"{self.max_decoded_pixels} (max_decoded_pixels)")
            if max(w, h) / max(1, min(w, h)) > MAX_ASPECT_RATIO:
                raise RiskvaError(f"{name}: image is {w}x{h}: aspect ratio over {MAX_ASPECT_RATIO}")
            try:
                if self._as_prepared(img):
                    img.load()
                    return img.copy()
                rgb = decode_fitted(img, self.max_size)
            except Image.DecompressionBombError:
                raise RiskvaError(f"{name}: image exceeds Pillow's decompression-bomb limit") from None
            except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for bad data
                text = "image data is truncated" if "truncated" in str(exc).lower() else \
                    f"cannot decode image ({type(exc).__name__}: {exc})"
                raise RiskvaError(f"{name}: {text}") from None
        if self.jpeg_quality is None:
            return rgb
        return decode_jpeg(encode_jpeg(rgb, self.jpeg_quality))

    def _as_prepared(self, img: Image.Image) -> bool:
        """Is this already what ``prepare`` writes (upright RGB JPEG within the cap)?"""
        if self.jpeg_quality is None or img.format != "JPEG" or img.mode != "RGB" or orientation(img) != 1:
            return False
        return self.max_size is None or (img.size[0] <= self.max_size[0] and img.size[1] <= self.max_size[1])


def save_image_policy(dataset_path: str | Path, folder: str | Path) -> Path:
    """Training's one call: write the prepared folder's policy next to the saved processor."""
    return ImagePolicy.from_prepared(dataset_path).save(folder)
