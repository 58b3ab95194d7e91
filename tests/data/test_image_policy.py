"""The model's image policy (data/image_policy.py) gives exactly the pixels `riskva prepare` stored."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import build_raw_dataset, image_bytes, row, textured_image
from image_fixtures import exif6, mpo, png_header_only
from PIL import Image

from riskva_core.data.image_policy import IMAGE_POLICY_FILE, ImagePolicy, save_image_policy
from riskva_core.data.images import EncodeSpec, inspect_image
from riskva_core.data.prepare import PrepareConfig, prepare
from riskva_core.data.samples import read_samples
from riskva_core.errors import RiskvaError

POLICY = ImagePolicy(max_size=(320, 320), jpeg_quality=85)


def _prepared_pixels(tmp_path, data: bytes, name: str) -> np.ndarray:
    src = tmp_path / name
    src.write_bytes(data)
    rep = inspect_image(str(src), encode=EncodeSpec(POLICY.max_size, POLICY.jpeg_quality, str(tmp_path)))
    assert rep.ok, rep.reasons
    with Image.open(tmp_path / rep.encoded_name) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("kind", ["large", "exif6", "png", "small_png", "mpo"])
def test_raw_photo_gets_exactly_the_pixels_prepare_stored(tmp_path, kind):
    base = textured_image(3, (1008, 756))
    data = {"large": image_bytes(base, "JPEG", quality=95), "exif6": exif6(base, quality=95),
            "png": image_bytes(base, "PNG"), "small_png": image_bytes(base.resize((200, 150)), "PNG"), "mpo": mpo(base, quality=95)}[kind]
    served = np.asarray(POLICY.apply(data, "photo"))
    assert np.array_equal(served, _prepared_pixels(tmp_path, data, f"photo-{kind}"))
    assert served.shape[:2] == ((150, 200) if kind == "small_png" else (240, 320))  # upright, capped


def test_a_prepared_copy_passes_unchanged_so_evaluation_sees_what_training_saw(tmp_path):
    data = image_bytes(textured_image(1, (1008, 756)), "JPEG", quality=95)
    src = tmp_path / "p.jpg"
    src.write_bytes(data)
    rep = inspect_image(str(src), encode=EncodeSpec(POLICY.max_size, POLICY.jpeg_quality, str(tmp_path)))
    prepared = (tmp_path / rep.encoded_name).read_bytes()
    with Image.open(tmp_path / rep.encoded_name) as img:
        trained_on = np.asarray(img.convert("RGB"))
    assert np.array_equal(np.asarray(POLICY.apply(prepared, "copy")), trained_on)  # no second JPEG generation


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_pixel_limit_is_read_from_the_header_before_decoding():
    bomb = png_header_only(13000, 13000)
    with pytest.raises(RiskvaError, match=r"^row 3: image is 13000x13000 = 169000000 pixels, over the limit of "
                                          r"40000000 \(max_decoded_pixels\)$"):
        ImagePolicy().apply(bomb, "row 3")
    # Under a higher limit the same bytes get as far as decoding, and fail there: the check above never decoded.
    with pytest.raises(RiskvaError, match="truncated|cannot decode"):
        ImagePolicy(max_decoded_pixels=200_000_000).apply(bomb, "row 3")


@pytest.mark.parametrize("data, message", [
    (b"", "empty image"),
    (b"not an image at all", "not a recognised image file"),
    (image_bytes(textured_image(0, (64, 48)), "GIF"), "format GIF is not allowed"),
])
def test_bad_bytes_are_one_line_errors_naming_the_row(data, message):
    with pytest.raises(RiskvaError, match=f"^row 7: .*{message}"):
        POLICY.apply(data, "row 7")


def test_policy_is_saved_from_the_prepared_folder_and_loaded_back(tmp_path):
    raw = build_raw_dataset(tmp_path / "raw", [row(i) for i in range(6)])
    out = tmp_path / "prepared"
    prepare(PrepareConfig(csv_path=raw.csv_path, image_base_path=raw.root, output_path=out, format="jsonl",
                          image_quality=77, max_image_size=(300, 200), num_workers=1))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = save_image_policy(out, model_dir)
    assert path.name == IMAGE_POLICY_FILE
    loaded = ImagePolicy.load(None, tmp_path / "nothing", model_dir)
    assert loaded == ImagePolicy(max_size=(300, 200), jpeg_quality=77)
    assert ImagePolicy.load(tmp_path) == ImagePolicy()  # no file: the default policy
    for s in read_samples(out, "train"):  # every prepared copy is a fixed point of the policy
        assert np.array_equal(np.asarray(loaded.apply(s.image_data(), s.id)), np.asarray(s.load_image()))
    (model_dir / IMAGE_POLICY_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(RiskvaError, match="unreadable image policy"):
        ImagePolicy.load(model_dir)
    with pytest.raises(RiskvaError, match="max_size needs two sizes"):
        ImagePolicy(max_size=(10, 10))
