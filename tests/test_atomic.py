import pytest

from riskva_core.atomic import atomic_dir, write_json, atomic_path


def test_write_json_is_byte_stable(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1, "a": "风险"})
    first = (tmp_path / "a.json").read_bytes()
    write_json(tmp_path / "a.json", {"a": "风险", "b": 1})
    assert (tmp_path / "a.json").read_bytes() == first
    assert "风险".encode() in first  # not \u-escaped


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_dir_swaps_whole_folder(tmp_path):
    target = tmp_path / "prepared"
    with atomic_dir(target) as d:
        (d / "x").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "y").write_text("2")
            raise RuntimeError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["x"]
    with atomic_dir(target) as d:
        (d / "z").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["z"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_outputs_get_umask_permissions_not_tempfile_ones(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {})
        with atomic_dir(tmp_path / "d"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_a_folder_of_safetensors_comes_out_group_readable(tmp_path):
    """safetensors writes 0600 files; a finished folder gets what the umask allows, like any HF save."""
    import os

    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as d:
            (d / "sub").mkdir(mode=0o700)
            save_file({"w": torch.zeros(2)}, str(d / "sub" / "model.safetensors"))
            raw = (d / "sub" / "model.safetensors").stat().st_mode & 0o777
    finally:
        os.umask(old)
    assert raw == 0o600  # what safetensors itself leaves (the reason for make_readable)
    assert (tmp_path / "model" / "sub").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "model" / "sub" / "model.safetensors").stat().st_mode & 0o777 == 0o644
