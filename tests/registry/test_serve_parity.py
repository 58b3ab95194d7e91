"""Serving answers a phone photo exactly as evaluation did, within limits, also over an OpenAI API.

One raw dataset holds an upright photo, its EXIF-orientation-6 twin and a 4032x3024 version;
``riskva prepare`` caps them (and the other rows) at 448x448. The tiny model built on the
prepared folder gets the folder's image policy as training would save it, is registered with
alias ``champion`` and is served twice on loopback for the whole module: MLflow's scoring
server (``riskva serve``) and the OpenAI-compatible one (``riskva serve --api openai``).
"""
from __future__ import annotations

import base64
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import build_raw_dataset, image_bytes, row, textured_image
from image_fixtures import exif6, png_header_only
from model_fixtures import make_tiny_model
from PIL import Image
from servers import ServerProcess, free_port

from riskva_core.data.image_policy import ImagePolicy, save_image_policy
from riskva_core.data.prepare import PrepareConfig, prepare
from riskva_core.data.samples import SPLITS, read_samples
from riskva_core.evaluate.predict import predict_split
from riskva_core.paths import DataRoot
from riskva_core.registry.client import Registry
from riskva_core.registry.serve import request_payload
from riskva_core.schema import FIELDS

RISKVA = str(Path(sys.executable).with_name("riskva"))
TOKENS = 12
PHOTOS = ("photos/upright.jpg", "photos/exif6.jpg", "photos/large.jpg")
OPENAI_MAX_BODY = 6_000_000


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RISKVA_"))}
    env.update(RISKVA_HOME=str(home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _data_url(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def _chat(image_url: str) -> dict:
    return {"model": "riskva", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "描述风险"}, {"type": "image_url", "image_url": {"url": image_url}}]}]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    scene = textured_image(5, (1200, 900))
    photos = {PHOTOS[0]: image_bytes(scene, "JPEG", quality=92), PHOTOS[1]: exif6(scene),
              PHOTOS[2]: image_bytes(scene.resize((4032, 3024), Image.Resampling.BICUBIC), "JPEG", quality=92)}
    rows = [row(i, image_path=p) for i, p in enumerate(PHOTOS)] + [row(i) for i in range(3, 12)]
    raw = build_raw_dataset(tmp / "raw", rows, images=photos, image_size=(1200, 900))
    ds = tmp / "prepared"
    prepare(PrepareConfig(csv_path=raw.csv_path, image_base_path=raw.root, output_path=ds, format="jsonl",
                          max_image_size=(448, 448), num_workers=1, val_ratio=0.2, test_ratio=0.3))
    model = make_tiny_model(tmp / "tiny", ds)
    save_image_policy(ds, model)  # what training writes next to the processor
    home = tmp / "home"
    reg = Registry.under(DataRoot(home))
    rv = reg.log_model(model, example_image=photos[PHOTOS[0]],
                       model_config={"max_new_tokens": TOKENS, "batch_size": 4, "max_rows": 8})
    reg.set_alias("champion", rv.version)
    small = [s.image_data() for split in SPLITS for s in read_samples(ds, split)]
    return {"tmp": tmp, "raw": raw, "ds": ds, "model": model, "home": home, "reg": reg, "photos": photos,
            "small": small}


@pytest.fixture(scope="module")
def servers(world, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve-logs")
    ports = free_port(), free_port()
    env = _env(world["home"])
    mlflow_srv = ServerProcess([RISKVA, "serve", "--port", str(ports[0])], env=env, log=logs / "mlflow.log",
                               name="riskva serve")
    openai_srv = ServerProcess([RISKVA, "serve", "--api", "openai", "--port", str(ports[1]), "--max_request_bytes",
                                str(OPENAI_MAX_BODY)], env=env, log=logs / "openai.log", name="riskva serve --api openai")
    with mlflow_srv, openai_srv:
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        mlflow_srv.wait_http(f"{urls[0]}/ping", timeout=300)
        openai_srv.wait_http(f"{urls[1]}/health", timeout=120)  # liveness at once, while the model loads
        openai_srv.wait_http(f"{urls[1]}/ready", timeout=300)
        yield {"mlflow": urls[0], "openai": urls[1], "mlflow_srv": mlflow_srv, "openai_srv": openai_srv}


@pytest.fixture(scope="module")
def client(servers):
    from openai import OpenAI

    return OpenAI(base_url=f"{servers['openai']}/v1", api_key="unused", max_retries=0, timeout=300)


def test_infer_pyfunc_both_servers_and_evaluation_answer_a_photo_identically(world, servers, client):
    import mlflow
    import pandas as pd

    raw_root, photos = world["raw"].root, world["photos"]
    # riskva infer on the raw photos
    lst = world["tmp"] / "photos.txt"
    lst.write_text("".join(f"{raw_root / p}\n" for p in PHOTOS), encoding="utf-8")
    out = world["tmp"] / "infer.json"
    proc = subprocess.run([RISKVA, "infer", "--model_path", str(world["model"]), "--image_list", str(lst),
                           "--output_file", str(out), "--max_new_tokens", str(TOKENS), "--no_progress"],
                          env=_env(world["home"]), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    infer_out = [r["raw_output"] for r in json.loads(out.read_text(encoding="utf-8"))]
    # the registered pyfunc in-process
    world["reg"].activate()
    model = mlflow.pyfunc.load_model("models:/riskva@champion")
    pyfunc_out = model.predict(pd.DataFrame({"image": [photos[p] for p in PHOTOS]}))["raw_output"].tolist()
    # MLflow's scoring server and the OpenAI-compatible server
    resp = requests.post(f"{servers['mlflow']}/invocations", json=request_payload([photos[p] for p in PHOTOS]),
                         timeout=300)
    assert resp.status_code == 200, resp.text
    http_out = [p["raw_output"] for p in resp.json()["predictions"]]
    openai_out = [client.chat.completions.create(**_chat(_data_url(photos[p]))).choices[0].message.content
                  for p in PHOTOS]
    # evaluation (predict_split through the pyfunc) on the prepared copy of each photo
    evaluated = {r["image_path"]: r["raw_output"] for split in SPLITS
                 for r in predict_split("models:/riskva@champion", world["ds"], split)}
    eval_out = [evaluated[p] for p in PHOTOS]
    assert infer_out == pyfunc_out == http_out == openai_out == eval_out, \
        {"infer": infer_out, "pyfunc": pyfunc_out, "http": http_out, "openai": openai_out, "eval": eval_out}
    # ... because every path feeds the model the prepared copy's exact pixels, upright and capped.
    policy = ImagePolicy.load(world["model"])
    prepared = {s.image_path: s for split in SPLITS for s in read_samples(world["ds"], split)}
    for p in PHOTOS:
        served = np.asarray(policy.apply(photos[p], p))
        assert served.shape == (336, 448, 3)
        assert np.array_equal(served, np.asarray(prepared[p].load_image()))


def test_openai_client_gets_the_openai_shape_with_the_parsed_fields(world, servers, client):
    photo = world["small"][0]
    r = client.chat.completions.create(**_chat(_data_url(photo)))
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == TOKENS else "stop")
    extra = r.model_extra["riskva"]
    assert set(extra["parsed"]) == set(FIELDS) and isinstance(extra["parse_ok"], bool) and extra["error"] is None
    bare = client.chat.completions.create(**_chat(base64.b64encode(photo).decode()))  # bare base64 works too
    assert bare.choices[0].message.content == r.choices[0].message.content
    models = requests.get(f"{servers['openai']}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["riskva"]


def test_openai_refusals_are_4xx_in_the_openai_error_shape(world, servers, client):
    import openai

    photo = world["small"][0]
    cases = [
        (_chat("https://example.com/photo.jpg"), 400, "remote image URLs are not fetched"),
        (_chat(_data_url(b"this is not an image")), 400, "the image: not a recognised image file"),
        (_chat(_data_url(photo[: len(photo) // 3])), 400, "the image:"),
        (_chat(_data_url(png_header_only(13000, 13000))), 400, "over the limit of 40000000 (max_decoded_pixels)"),
        ({**_chat(_data_url(photo)), "n": 2}, 400, "'n' is not supported"),
    ]
    two = _chat(_data_url(photo))
    two["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": _data_url(photo)}})
    cases.append((two, 400, "one photo; it carries 2 image_url parts"))
    cases.append((_chat(_data_url(b"\xff" * OPENAI_MAX_BODY)), 413, "(max_request_bytes)"))
    for body, status, message in cases:
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(**body)
        assert info.value.status_code == status, (message, info.value.response.text[:300])
        error = info.value.response.json()["error"]
        assert message in error["message"] and error["type"] == "invalid_request_error", error
    assert servers["openai_srv"].alive()
    assert client.chat.completions.create(**_chat(_data_url(photo))).choices[0].message.content


def test_dataframe_bad_rows_get_their_error_and_the_others_are_answered(world, servers):
    url = f"{servers['mlflow']}/invocations"
    good = world["small"][0]
    bomb = png_header_only(13000, 13000)
    resp = requests.post(url, json=request_payload([good, b"not an image", bomb]), timeout=300)
    assert resp.status_code == 200, resp.text
    preds = resp.json()["predictions"]
    assert preds[0]["error"] == "" and preds[0]["raw_output"]
    assert preds[1]["error"] == "row 1: not a recognised image file" and preds[1]["raw_output"] == ""
    assert preds[2]["error"].startswith("row 2: image is 13000x13000") and "max_decoded_pixels" in preds[2]["error"]
    # Nothing answerable, or over a request limit: a 400 naming the rows / the limit.
    only_bad = requests.post(url, json=request_payload([b"not an image"]), timeout=300)
    assert only_bad.status_code == 400 and "row 0: not a recognised image file" in only_bad.json()["message"]
    too_many = requests.post(url, json=request_payload([good] * 9), timeout=300)
    assert too_many.status_code == 400 and "9 rows, over the limit of 8 (max_rows)" in too_many.json()["message"]
    assert servers["mlflow_srv"].alive()


def test_predict_split_and_infer_isolate_a_bad_image_the_same_way(world, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(world["ds"], ds)
    test = read_samples(ds, "test")
    test[0].image_file.write_bytes(b"corrupt")
    world["reg"].activate()
    records = predict_split("models:/riskva@champion", ds, "test")
    assert records[0]["error"].startswith(f"sample {test[0].id}: row 0: not a recognised image file")
    assert all("error" not in r and r["raw_output"] for r in records[1:])
    out = tmp_path / "infer.json"
    proc = subprocess.run([RISKVA, "infer", "--model_path", str(world["model"]), "--dataset_path", str(ds),
                           "--output_file", str(out), "--max_new_tokens", str(TOKENS), "--no_progress"],
                          env=_env(world["home"]), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]  # one failed image
    recs = json.loads(out.read_text(encoding="utf-8"))
    assert "not a recognised image file" in recs[0]["error"]
    assert [r["raw_output"] for r in recs[1:]] == [r["raw_output"] for r in records[1:]]


def test_load_200_requests_from_20_clients_mixed_valid_and_corrupt(world, servers):
    """Bounded load on loopback: no valid request fails, corrupt ones are 400s, the server still answers."""
    url = f"{servers['openai']}/v1/chat/completions"
    valid = [_chat(_data_url(b)) for b in world["small"]]
    corrupt = [_chat(_data_url(b"corrupt" * 20)), _chat(_data_url(world["small"][0][:300]))]
    jobs = [(valid[i % len(valid)], True) if i % 4 else (corrupt[i % 2], False) for i in range(200)]

    def send(job):
        body, ok = job
        start = time.perf_counter()
        resp = requests.post(url, json=body, timeout=300)
        return ok, resp.status_code, time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(send, jobs))
    latencies = sorted(t for _, _, t in results)
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * len(latencies)) - 1]
    errors = sum(1 for _, status, _ in results if status != 200)
    print(f"\nload: 200 requests, 20 clients: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
          f"error rate {errors / 200:.2f} (all from the {sum(1 for _, ok in jobs if not ok)} corrupt requests)")
    assert [s for ok, s, _ in results if ok] == [200] * 150
    assert [s for ok, s, _ in results if not ok] == [400] * 50
    assert servers["openai_srv"].alive()
    assert requests.post(url, json=valid[0], timeout=120).status_code == 200


def test_serve_limit_flags_override_the_registered_model_config(world, monkeypatch):
    """`riskva serve --max_rows 1` reaches the pyfunc through MLflow's MLFLOW_PYFUNC_INFERENCE_CONFIG."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from riskva_core.registry.serve import ServeConfig, server_env

    env = server_env(ServeConfig(max_rows=1, max_request_bytes=10_000_000, check_model=False))
    monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", env["MLFLOW_PYFUNC_INFERENCE_CONFIG"])
    world["reg"].activate()
    model = mlflow.pyfunc.load_model("models:/riskva@champion")
    with pytest.raises(MlflowException, match=r"2 rows, over the limit of 1 \(max_rows\)") as err:
        model.predict(pd.DataFrame({"image": world["small"][:2]}))
    assert err.value.get_http_status_code() == 400
    assert model.predict(pd.DataFrame({"image": world["small"][:1]}))["error"].tolist() == [""]
