"""Logging the RisKVA pyfunc to a sqlite MLflow under the data root, and using it."""
from __future__ import annotations

import base64
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from model_fixtures import make_prepared_dataset, make_tiny_model

from riskva_core.registry import pyfunc
from riskva_core.paths import DataRoot
from riskva_core.registry.client import Registry
from riskva_core.data.samples import read_samples
from riskva_core.schema import FIELDS


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reg")
    ds = make_prepared_dataset(tmp / "ds", n=8)
    model = make_tiny_model(tmp / "tiny", ds)
    root = DataRoot(tmp / "home")
    reg = Registry.under(root)
    image = read_samples(ds, "test")[0].image_file.read_bytes()
    rv = reg.log_model(model, example_image=image, tags={"dataset_version": "v1", "data_version.raw_metadata": "abc"},
                       params={"dataset_version": "v1"}, model_config={"max_new_tokens": 8, "batch_size": 2})
    return reg, rv, root, image


def test_version_is_registered_under_the_data_root_with_tags(logged):
    reg, rv, root, _ = logged
    assert reg.tracking_uri == f"sqlite:///{root.root / 'mlflow' / 'mlflow.db'}"
    assert (root.root / "mlflow" / "mlflow.db").is_file()
    assert rv.name == "riskva" and rv.version == "1" and rv.model_uri == "models:/riskva/1"
    mv = reg.get_version("1")
    assert mv.tags["dataset_version"] == "v1" and mv.tags["data_version.raw_metadata"] == "abc"
    # Artifacts (the merged model folder, safetensors) live under <root>/mlflow/artifacts.
    assert list((root.root / "mlflow" / "artifacts").rglob("model.safetensors"))
    reg.set_alias("challenger", rv.version)
    assert reg.alias_version("challenger") == "1" and reg.alias_version("champion") is None
    assert reg.version_url("1").endswith("/#/models/riskva/versions/1")


def test_pyfunc_loads_by_alias_and_predicts_bytes_and_base64(logged):
    reg, rv, _, image = logged
    reg.set_alias("challenger", rv.version)
    reg.activate()
    model = mlflow.pyfunc.load_model("models:/riskva@challenger")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["image"]
    assert [c.name for c in model.metadata.get_output_schema().inputs] == [*FIELDS, "raw_output", "parse_ok"]
    out = model.predict(pd.DataFrame({"image": [image, image]}))
    assert list(out.columns) == [*FIELDS, "raw_output", "parse_ok"] and len(out) == 2
    assert out["raw_output"].map(lambda s: isinstance(s, str) and len(s) > 0).all()
    # Deterministic greedy decoding: the same image gives the same text.
    assert out["raw_output"][0] == out["raw_output"][1]
    # base64 text (what HTTP clients send) goes through the same path when the schema is bypassed.
    raw = model.unwrap_python_model()
    b64 = raw.predict(None, pd.DataFrame({"image": [base64.b64encode(image).decode()]}))
    assert b64["raw_output"][0] == out["raw_output"][0]


def test_corrupt_image_is_a_clear_400_class_error(logged):
    reg, rv, _, _ = logged
    reg.activate()
    model = mlflow.pyfunc.load_model(rv.model_uri)
    with pytest.raises(MlflowException) as err:
        model.predict(pd.DataFrame({"image": [b"not an image at all"]}))
    assert err.value.get_http_status_code() == 400 and "row 0" in err.value.message


def test_metrics_land_on_the_version(logged):
    reg, rv, _, _ = logged
    reg.log_metrics(rv.version, {"parse_rate": 0.5, "level_accuracy": 0.25, "severe_recall": None})
    tags = reg.get_version(rv.version).tags
    assert tags["eval.parse_rate"] == "0.5" and "eval.severe_recall" not in tags
    run = reg.client().get_run(rv.run_id)
    assert run.data.metrics["eval.level_accuracy"] == 0.25


def test_log_model_rejects_a_folder_that_is_not_a_model(tmp_path: Path):
    from riskva_core.errors import RiskvaError

    reg = Registry.under(DataRoot(tmp_path / "home"))
    with pytest.raises(RiskvaError, match="not a model folder"):
        reg.log_model(tmp_path, example_image=b"")
    assert pyfunc.code_file(tmp_path).read_text().count("set_model") == 1
