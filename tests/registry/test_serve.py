"""`riskva serve`: the champion model over HTTP, driven by a real HTTP client (requests).

One tiny model is registered in a temporary data root and given the alias ``champion``;
``riskva serve`` (→ ``mlflow models serve --env-manager local``) runs on a free loopback
port for the whole module and is always stopped at the end.
"""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from model_fixtures import make_prepared_dataset, make_tiny_model
from servers import ServerProcess, free_port

from riskva_core.errors import RiskvaError
from riskva_core.paths import DataRoot
from riskva_core.registry.client import Registry
from riskva_core.data.samples import read_samples
from riskva_core.schema import FIELDS, LEVELS
from riskva_core.registry.serve import ServeConfig, request_payload, server_command, server_env

RISKVA = str(Path(sys.executable).with_name("riskva"))
REQUEST_TIMEOUT = 120
MAX_NEW_TOKENS = 12


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RISKVA_"))}
    env.update(RISKVA_HOME=str(home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    ds = make_prepared_dataset(tmp / "ds", n=10)
    model = make_tiny_model(tmp / "tiny", ds)
    home = tmp / "home"
    reg = Registry.under(DataRoot(home))
    images = [s.image_file.read_bytes() for s in read_samples(ds, "test")] + \
             [s.image_file.read_bytes() for s in read_samples(ds, "val")]
    rv = reg.log_model(model, example_image=images[0], model_config={"max_new_tokens": MAX_NEW_TOKENS, "batch_size": 4})
    reg.set_alias("champion", rv.version)
    return home, reg, rv, images


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory):
    home, _, _, _ = registered
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    server_tmp = tmp_path_factory.mktemp("server-tmp")  # the server's TMPDIR: where a start-up copy would go
    with ServerProcess([RISKVA, "serve", "--port", str(port)], env={**_env(home), "TMPDIR": str(server_tmp)},
                       log=log, name="riskva serve") as srv:
        url = f"http://127.0.0.1:{port}"
        srv.wait_http(f"{url}/ping", timeout=240)
        srv.server_tmp = server_tmp
        yield url, srv


def _post(url: str, body, timeout: float = REQUEST_TIMEOUT) -> requests.Response:
    return requests.post(f"{url}/invocations", json=body, timeout=timeout)


def test_serve_prints_the_url_and_curl_examples(server):
    url, srv = server
    out = srv.tail(20000)
    assert f"{url}/invocations" in out and "curl -s" in out and "base64 -w0" in out
    assert "models:/riskva@champion (version 1)" in out


def test_a_local_artifact_is_served_in_place_without_a_temporary_copy(server, registered):
    _, srv = server
    _, reg, _, _ = registered
    served = Path(re.search(r"artifacts  (\S+) \(loaded in place\)", srv.tail(20000))[1])
    assert served.resolve().is_relative_to(Path(reg.artifact_root).resolve()) and (served / "MLmodel").is_file()
    assert not list(srv.server_tmp.rglob("*.safetensors"))


def test_base64_jpeg_returns_the_four_fields_and_raw_text(server, registered):
    import mlflow
    import pandas as pd

    url, _ = server
    _, reg, _, images = registered
    resp = _post(url, request_payload(images[:2]))
    assert resp.status_code == 200, resp.text
    preds = resp.json()["predictions"]
    assert len(preds) == 2
    for p in preds:
        assert set(p) == {*FIELDS, "raw_output", "parse_ok", "error", "prompt_tokens", "completion_tokens",
                          "finish_reason", "level_confidence"}
        assert p["error"] == "" and p["prompt_tokens"] > 0 and 0 < p["completion_tokens"] <= MAX_NEW_TOKENS
        assert p["finish_reason"] == ("length" if p["completion_tokens"] == MAX_NEW_TOKENS else "stop")
        assert isinstance(p["raw_output"], str) and p["raw_output"]
        assert isinstance(p["parse_ok"], bool)
        assert p["风险等级"] in ("", *LEVELS)
    # The server answers exactly what the registered pyfunc answers in-process (greedy decoding).
    reg.activate()
    local = mlflow.pyfunc.load_model("models:/riskva@champion").predict(pd.DataFrame({"image": images[:2]}))
    assert [p["raw_output"] for p in preds] == local["raw_output"].tolist()


def test_decoding_params_reach_the_pyfunc_through_invocations(server, registered):
    """MLflow inference params (the signature's ParamSchema): the same decoding fields as the OpenAI API."""
    url, _ = server
    _, _, _, images = registered
    full = _post(url, request_payload(images[:1])).json()["predictions"][0]
    cut = _post(url, {**request_payload(images[:1]), "params": {"max_new_tokens": 3}})
    assert cut.status_code == 200, cut.text
    row = cut.json()["predictions"][0]
    assert row["completion_tokens"] <= 3 and full["raw_output"].startswith(row["raw_output"])
    assert row["finish_reason"] == ("length" if row["completion_tokens"] == 3 else "stop")
    bad = _post(url, {**request_payload(images[:1]), "params": {"temperature": 5.0}})
    assert bad.status_code == 400 and "temperature must be 0..2" in bad.json()["message"], bad.text


def test_inputs_spelling_gives_the_same_answer(server, registered):
    """MLflow's other JSON spelling, ``{"inputs": {"image": [b64]}}``: it reaches the pyfunc as
    numpy bytes holding the base64 text (not decoded), which the pyfunc must decode itself."""
    url, _ = server
    _, _, _, images = registered
    split = _post(url, request_payload(images[:1]))
    inputs = _post(url, {"inputs": {"image": [base64.b64encode(images[0]).decode()]}})
    assert split.status_code == 200 and inputs.status_code == 200, inputs.text[-300:]
    assert inputs.json()["predictions"][0]["raw_output"] == split.json()["predictions"][0]["raw_output"]


def test_corrupt_row_gets_its_error_the_others_are_answered_and_the_server_keeps_serving(server, registered):
    url, srv = server
    _, _, _, images = registered
    truncated = images[0][: len(images[0]) // 3]
    for bad in (b"this is not an image", truncated):
        resp = _post(url, request_payload([images[1], bad]))
        assert resp.status_code == 200, (resp.status_code, resp.text)
        good, failed = resp.json()["predictions"]
        assert good["error"] == "" and good["raw_output"]
        assert failed["error"].startswith("row 1: ") and failed["raw_output"] == "" and failed["parse_ok"] is False
        # Alone, the bad row leaves nothing to answer: a 400 naming it.
        alone = _post(url, request_payload([bad]))
        assert 400 <= alone.status_code < 500, (alone.status_code, alone.text)
        body = alone.json()
        assert body["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
        assert "row 0" in body["message"], body["message"]
    # Text that is not base64 at all is refused by the scoring server's schema check.
    resp = _post(url, {"dataframe_split": {"columns": ["image"], "data": [["%%% not base64 %%%"]]}})
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    assert srv.alive()
    ok = _post(url, request_payload(images[:1]))
    assert ok.status_code == 200 and ok.json()["predictions"][0]["raw_output"]


def test_twenty_concurrent_requests_all_succeed(server, registered):
    url, srv = server
    _, _, _, images = registered
    n = 20
    bodies = [request_payload([images[i % len(images)]]) for i in range(n)]
    with ThreadPoolExecutor(max_workers=n) as pool:
        responses = list(pool.map(lambda b: _post(url, b, timeout=300), bodies))
    assert [r.status_code for r in responses] == [200] * n, [r.text[:200] for r in responses if r.status_code != 200]
    outputs = [r.json()["predictions"][0]["raw_output"] for r in responses]
    # Same image → same answer, whichever request it came in (no cross-talk between threads).
    by_image: dict[int, set[str]] = {}
    for i, text in enumerate(outputs):
        by_image.setdefault(i % len(images), set()).add(text)
    assert all(len(texts) == 1 for texts in by_image.values()), by_image
    assert srv.alive()


def test_unset_alias_is_a_one_line_error_before_any_server_starts(registered):
    home, _, _, _ = registered
    proc = subprocess.run([RISKVA, "serve", "--model_uri", "models:/riskva@nobody", "--port", str(free_port())],
                          env=_env(home), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "no version of 'riskva' has the alias 'nobody'" in err[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--port", "0"], "--port must be 1..65535"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--max_decoded_pixels", "0"], "--max_decoded_pixels must be >= 1"),
    (["--max_queue", "0"], "--max_queue must be >= 1"),
    (["--api", "grpc"], "invalid choice: 'grpc'"),
])
def test_bad_flags_are_one_line_errors(flags, message, tmp_path):
    proc = subprocess.run([RISKVA, "serve", *flags], env=_env(tmp_path / "home"), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_command_and_environment_point_mlflow_at_the_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("RISKVA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RISKVA_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin")
    config = ServeConfig(port=6123, workers=2, timeout=90)
    command = server_command(config)
    # MLflow's scoring app behind the body limit (scoring_app.py), under uvicorn like `mlflow models serve`.
    assert command[:5] == [sys.executable, "-m", "uvicorn", "riskva_core.registry.scoring_app:app_from_env", "--factory"]
    assert command[command.index("--port") + 1] == "6123" and command[command.index("--workers") + 1] == "2"
    env = server_env(config)
    assert json.loads(env["RISKVA_SCORING_CONFIG"]) == {"model_uri": "models:/riskva@champion",
                                                        "served_uri": "models:/riskva@champion", "model_version": None}
    assert env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] == "90"
    expected = f"sqlite:///{(tmp_path / 'home').resolve() / 'mlflow' / 'mlflow.db'}"
    assert env["MLFLOW_TRACKING_URI"] == expected and env["MLFLOW_REGISTRY_URI"] == expected
    # MLflow starts `uvicorn` by name: this venv's bin must come first.
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    # --torch_dtype reaches the pyfunc's model_config; a local artifact folder is what MLflow loads.
    config = ServeConfig(torch_dtype="bfloat16", artifact_dir=str(tmp_path / "artifacts"))
    assert json.loads(server_env(config)["MLFLOW_PYFUNC_INFERENCE_CONFIG"]) == {"torch_dtype": "bfloat16"}
    assert json.loads(server_env(config)["RISKVA_SCORING_CONFIG"])["model_uri"] == str(tmp_path / "artifacts")
    with pytest.raises(RiskvaError, match="--torch_dtype float16 is refused"):
        ServeConfig(torch_dtype="float16")
    monkeypatch.setenv("RISKVA_MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert server_env(ServeConfig())["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
