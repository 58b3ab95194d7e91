"""Pinning a base model once per run: a hub id to its snapshot commit, an MLflow alias to its version
(downloaded once), and every process that is handed the pin loading that copy."""
from __future__ import annotations

import json

import pytest

from model_fixtures import make_hf_cache_snapshot
from riskva_core.errors import RiskvaError
from riskva_core.model.pin import PinnedModel, pin_model_ref
from riskva_core.model.resolve import PIN_FILE, PINS_ENV, resolve_model_ref

HUB_ID = "Qwen/Qwen2.5-VL-7B-Instruct"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A model folder as far as pinning is concerned (config + weights file); pinning never loads it, and
    tests/assets/test_resume.py trains the real tiny model through a pinned hub id."""
    folder = tmp_path_factory.mktemp("pin") / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "hidden_size": 64}))
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    return folder


def test_a_hub_id_is_pinned_to_its_snapshot_commit_and_the_pin_outlives_refs_main(tiny, tmp_path, monkeypatch):
    repo = make_hf_cache_snapshot(tmp_path / "hub", HUB_ID, "abc123", tiny, monkeypatch).parents[1]
    pin = pin_model_ref(HUB_ID)
    assert (pin.kind, pin.revision, pin.identity) == ("hub", "abc123", f"{HUB_ID}@abc123")
    assert pin.local_path == str(repo / "snapshots" / "abc123") and pin.pinned_ref == HUB_ID
    assert PinnedModel.from_dict(json.loads(json.dumps(pin.to_dict()))) == pin
    # refs/main moves on (a download of a newer commit) while the run is under way.
    make_hf_cache_snapshot(tmp_path / "hub", HUB_ID, "def456", tiny)
    assert resolve_model_ref(HUB_ID).name == "def456"  # an unpinned process would now load the new commit
    monkeypatch.setenv(*next(iter(pin.env().items())))
    assert resolve_model_ref(HUB_ID) == repo / "snapshots" / "abc123"  # a process handed the pin does not
    monkeypatch.setenv(PINS_ENV, json.dumps({HUB_ID: str(tmp_path / "gone")}))
    with pytest.raises(RiskvaError, match=f"^--model_name_or_path {HUB_ID}: pinned to .*gone .*not a folder"):
        resolve_model_ref(HUB_ID)
    # A plain folder is its own pin: nothing to hand the processes.
    assert pin_model_ref(str(tiny)).env() == {} and pin_model_ref(str(tiny)).revision is None


def test_an_mlflow_alias_is_pinned_to_its_version_and_downloaded_once(tiny, tmp_path, monkeypatch, request):
    from mlflow import MlflowClient

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    # An earlier test in the same process may have set MLflow's process-wide URIs, which win over the
    # environment: point them here for this test and put them back afterwards.
    saved = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    request.addfinalizer(lambda: (mlflow.set_tracking_uri(saved[0]), mlflow.set_registry_uri(saved[1])))
    client = MlflowClient(uri, uri)
    client.create_registered_model("riskva-pin")
    for _ in range(2):
        client.create_model_version("riskva-pin", source=str(tiny))
    client.set_registered_model_alias("riskva-pin", "champion", "1")
    dest = tmp_path / "base"
    pin = pin_model_ref("models:/riskva-pin@champion", dest)
    assert (pin.kind, pin.revision, pin.pinned_ref) == ("mlflow", "1", "models:/riskva-pin/1")
    assert pin.identity == "models:/riskva-pin/1" and (dest / "config.json").is_file()
    assert json.loads((dest / PIN_FILE).read_text())["pinned_ref"] == "models:/riskva-pin/1"
    assert json.loads(pin.env()[PINS_ENV]) == {"models:/riskva-pin/1": str(dest.resolve())}
    stamp = (dest / "config.json").stat().st_mtime_ns
    assert pin_model_ref("models:/riskva-pin/1", dest) == PinnedModel(**{**pin.__dict__, "ref": "models:/riskva-pin/1"})
    assert (dest / "config.json").stat().st_mtime_ns == stamp  # the same version again: not downloaded again
    # The alias moves (a promotion): a new pin names the new version; the old pin still names version 1.
    client.set_registered_model_alias("riskva-pin", "champion", "2")
    assert pin_model_ref("models:/riskva-pin@champion", dest).revision == "2"
    with pytest.raises(RiskvaError, match="^--base_model_path models:/riskva-pin@nobody: cannot resolve in MLflow"):
        pin_model_ref("models:/riskva-pin@nobody", dest)
