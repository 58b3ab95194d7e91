"""`make demo`'s dataset step: a new version is synthesised, an existing one is kept and named."""
from riskva_assets.demo import ensure_dataset
from riskva_core.paths import DataRoot
from riskva_core.synth.generate import GENERATOR_VERSION


def test_existing_dataset_is_kept_and_a_different_draw_is_pointed_out(tmp_path, capsys):
    root = DataRoot(tmp_path)
    csv = ensure_dataset(root, "synthetic_v1", num_images=8, seed=0)
    first = csv.read_bytes()
    assert "synthesising 8 images" in capsys.readouterr().out

    assert ensure_dataset(root, "synthetic_v1", num_images=8, seed=0) == csv
    assert "note:" not in capsys.readouterr().out  # same draw: nothing to say

    assert ensure_dataset(root, "synthetic_v1", num_images=20, seed=0) == csv
    out = capsys.readouterr().out
    assert csv.read_bytes() == first  # a dataset version is never replaced
    assert f"with 8 images (this code: v{GENERATOR_VERSION}, 20)" in out
    assert f"--version synthetic_v1_v{GENERATOR_VERSION}" in out
