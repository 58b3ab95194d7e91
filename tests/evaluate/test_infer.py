from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from model_fixtures import make_parquet_twin, make_prepared_dataset, make_tiny_model
from riskva_core import cli
from riskva_core.errors import RiskvaError
from riskva_core.evaluate.infer import Generator, InferConfig, infer
from riskva_core.data.samples import read_samples
from riskva_core.schema import FIELDS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOKENS = 8  # the untrained tiny model writes garbage; a few tokens exercise the whole path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    ds = make_prepared_dataset(root / "jsonl", 10)
    pq = make_parquet_twin(ds, root / "parquet")
    model = make_tiny_model(root / "model", ds)
    gen = Generator(model, max_new_tokens=TOKENS)
    images = sorted((ds / "images").iterdir())
    corrupt = root / "corrupt.jpg"
    corrupt.write_bytes(images[0].read_bytes()[:200])  # a truncated JPEG
    return {"root": root, "ds": ds, "pq": pq, "model": model, "gen": gen, "images": images, "corrupt": corrupt}


def test_single_image_prints_a_report(env, capsys):
    rc = cli.main(["infer", "--model_path", str(env["model"]), "--image_path", str(env["images"][0]),
                   "--max_new_tokens", str(TOKENS)])
    out = capsys.readouterr().out
    assert rc == 0
    assert str(env["images"][0]) in out
    for f in FIELDS:
        assert f in out


def test_image_list_with_bad_images_goes_on(env, tmp_path, capsys):
    lst = env["root"] / "list.txt"
    rel = os.path.relpath(env["images"][1], lst.parent)
    lst.write_text(f"# photos\n{env['images'][0]}\n{env['corrupt'].name}\n\nmissing.jpg\n{rel}\n", encoding="utf-8")
    out = tmp_path / "out.json"
    rc = cli.main(["infer", "--model_path", str(env["model"]), "--image_list", str(lst), "--output_file", str(out),
                   "--max_new_tokens", str(TOKENS), "--batch_size", "3", "--no_progress"])
    assert rc == 2  # the exit status counts the failed images
    recs = json.loads(out.read_text(encoding="utf-8"))
    assert [r["image_path"] for r in recs] == [str(env["images"][0]), "corrupt.jpg", "missing.jpg", rel]
    assert "cannot decode" in recs[1]["error"] and "cannot read" in recs[2]["error"]
    for r in (recs[0], recs[3]):
        assert "error" not in r and isinstance(r["raw_output"], str)
        assert set(r["parsed"]) == set(FIELDS) and r["parse_ok"] is False  # garbage from random weights
    assert "4 images: 0 parsed, 2 unparsed, 2 failed" in capsys.readouterr().out


def test_parquet_with_corrupt_row_and_report(env, tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(env["pq"] / "train.parquet").to_pylist()
    table[2]["image"] = {"bytes": b"not an image", "path": "x.jpg"}
    import pyarrow as pa

    bad = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(table), bad)
    report_dir = tmp_path / "REPORT"
    cfg = InferConfig(model_path=str(env["model"]), parquet_file=bad, compare_gt=True, report_dir=report_dir,
                      max_new_tokens=TOKENS, batch_size=4, progress=False)
    recs = infer(cfg, generator=env["gen"])
    samples = read_samples(bad)
    assert [r["id"] for r in recs] == [s.id for s in samples]
    assert [r["ground_truth"] for r in recs] == [{f: s.fields[f] for f in FIELDS} for s in samples]
    assert "error" in recs[2] and sum("error" in r for r in recs) == 1
    assert json.loads((report_dir / "predictions.json").read_text(encoding="utf-8")) == recs
    report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    assert report["n"] == len(samples) and report["n_errors"] == 1
    assert report["parse_rate"] < 0.5  # untrained model
    assert (report_dir / "report.html").is_file() and (report_dir / "report.md").is_file()
    # thumbnails come from the Parquet bytes; the corrupt row has none
    assert 0 < len(list((report_dir / "thumbs").iterdir())) < len(samples)


def test_batched_generation_equals_one_at_a_time(env):
    imgs = [s.load_image() for s in read_samples(env["ds"], "train")[:4]]
    imgs[1] = imgs[1].resize((120, 72))  # different sizes → different prompt lengths → real left padding
    batched = env["gen"].generate(imgs)
    single = [env["gen"].generate([im])[0] for im in imgs]
    assert batched == single
    assert env["gen"].generate(imgs) == batched  # deterministic


def test_dataset_path_split_and_jsonl_file_agree(env, tmp_path):
    a = infer(InferConfig(model_path=str(env["model"]), dataset_path=env["ds"], split="test",
                          output_file=tmp_path / "a.json", progress=False), generator=env["gen"])
    b = infer(InferConfig(model_path=str(env["model"]), jsonl_file=env["ds"] / "test.jsonl",
                          output_file=tmp_path / "b.json", progress=False), generator=env["gen"])
    c = infer(InferConfig(model_path=str(env["model"]), dataset_path=env["pq"], split="test",
                          output_file=tmp_path / "c.json", progress=False), generator=env["gen"])
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert "ground_truth" not in a[0]
    # JSONL and Parquet carry the same JPEG bytes: same answers
    assert [r["raw_output"] for r in a] == [r["raw_output"] for r in c]
    assert c[0]["image"] == c[0]["id"] and Path(a[0]["image"]).is_file()


def test_adapter_applied_without_merging(env, tmp_path):
    from peft import LoraConfig, get_peft_model

    from riskva_core.model.loading import load_model

    peft_model = get_peft_model(load_model(env["model"]), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    imgs = [s.load_image() for s in read_samples(env["ds"], "val")[:2]]
    with_adapter = Generator(env["model"], adapter_path=tmp_path / "adapter", max_new_tokens=TOKENS)
    adapter_only = Generator(tmp_path / "adapter", max_new_tokens=TOKENS)  # base read from adapter_config.json
    assert type(with_adapter.model).__name__ == "PeftModel"
    # a fresh LoRA has B = 0, so the answers equal the base model's
    assert with_adapter.generate(imgs) == env["gen"].generate(imgs) == adapter_only.generate(imgs)


def test_mlflow_model_uri(env, tmp_path, monkeypatch):
    import mlflow
    import yaml

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    exp = mlflow.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        # the layout of a pyfunc logged with artifacts={"model_dir": ...}
        mlflow.log_artifacts(str(env["model"]), artifact_path="model/artifacts/model_dir")
        mlmodel = tmp_path / "MLmodel"
        mlmodel.write_text(yaml.safe_dump({"flavors": {"python_function": {
            "artifacts": {"model_dir": {"path": "artifacts/model_dir", "uri": str(env["model"])}}}}}))
        mlflow.log_artifact(str(mlmodel), artifact_path="model")
    gen = Generator(f"runs:/{run.info.run_id}/model", max_new_tokens=TOKENS)
    imgs = [s.load_image() for s in read_samples(env["ds"], "val")[:2]]
    assert gen.generate(imgs) == env["gen"].generate(imgs)
    assert not Path(gen.model_path).exists()  # the download is removed once the weights are loaded
    with pytest.raises(RiskvaError, match="cannot download"):
        Generator("runs:/0123456789abcdef/model")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "exactly one input"),
        ({"image_path": "a.jpg", "image_list": "l.txt"}, "exactly one input"),
        ({"image_path": "a.jpg", "compare_gt": True}, "--compare_gt needs ground truth"),
        ({"jsonl_file": "DS/test.jsonl"}, "--output_file"),
        ({"jsonl_file": "DS/test.jsonl", "report_dir": "R"}, "add --compare_gt"),
        ({"parquet_file": "nope.parquet", "output_file": "o.json"}, "no such file"),
        ({"image_path": "a.jpg", "batch_size": 0}, "--batch_size"),
    ],
)
def test_config_errors(env, kwargs, match):
    kwargs = {k: (str(env["ds"] / v[3:]) if isinstance(v, str) and v.startswith("DS/") else v)
              for k, v in kwargs.items()}
    with pytest.raises(RiskvaError, match=match):
        InferConfig(model_path=str(env["model"]), **kwargs)


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    rc = cli.main(["infer", "--model_path", str(tmp_path / "none"), "--image_path", str(tmp_path / "a.jpg")])
    assert rc == 2
    assert "no such model folder" in capsys.readouterr().err


def test_greedy_means_no_repetition_penalty_unless_set_and_the_report_records_it(env, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(env["model"], model)
    gc_file = model / "generation_config.json"
    gc = json.loads(gc_file.read_text(encoding="utf-8")) if gc_file.is_file() else {}
    gc.update(repetition_penalty=1.05, top_k=1, top_p=0.001, temperature=0.1)  # what Qwen2.5-VL-7B-Instruct ships
    gc_file.write_text(json.dumps(gc), encoding="utf-8")
    gen = Generator(model, max_new_tokens=TOKENS)
    assert gen.model.generation_config.repetition_penalty == 1.05  # the base model's setting is there...
    assert gen.generation_config.repetition_penalty == 1.0  # ...and not used
    assert gen.generation_config.do_sample is False and gen.generation_config.num_beams == 1
    imgs = [s.load_image() for s in read_samples(env["ds"], "train")[:2]]
    assert gen.generate(imgs) == env["gen"].generate(imgs)  # same as a model without the setting
    set_gen = Generator(model, max_new_tokens=TOKENS, repetition_penalty=1.3)
    assert set_gen.generation_config.repetition_penalty == 1.3
    report_dir = tmp_path / "R"
    infer(InferConfig(model_path=str(model), dataset_path=env["ds"], compare_gt=True, report_dir=report_dir,
                      max_new_tokens=TOKENS, progress=False, repetition_penalty=1.3), generator=set_gen)
    report = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    assert report["provenance"]["generation"] == {
        "do_sample": False, "num_beams": 1, "max_new_tokens": TOKENS, "repetition_penalty": 1.3,
        "repetition_penalty_source": "set", "seed": 0}
    assert "repetition_penalty=1.3" in (report_dir / "report.md").read_text(encoding="utf-8")
    with pytest.raises(RiskvaError, match="--repetition_penalty must be > 0"):
        InferConfig(model_path=str(model), image_path="a.jpg", repetition_penalty=0)


def _items(paths) -> list:
    from riskva_core.evaluate.inputs import image_items

    return image_items([str(p) for p in paths], None)


@pytest.mark.parametrize("bug", [IndexError, TypeError, ValueError])
def test_a_code_bug_fails_the_run_with_its_traceback_and_is_never_retried(env, monkeypatch, bug):
    """Before: a TypeError/IndexError was caught as "generation failed" on every row and scored as a
    wrong answer, after re-running the batch one photo at a time."""
    from riskva_core.evaluate.infer import run_items

    gen = env["gen"]
    calls: list[int] = []

    def buggy_generate(**kwargs):  # a bug in our code between the processor and the model
        calls.append(len(kwargs["input_ids"]))
        raise bug("the bug's own message")

    monkeypatch.setattr(gen.model, "generate", buggy_generate)
    with pytest.raises(bug, match="the bug's own message") as info:
        run_items(gen, _items(env["images"][:3]), batch_size=3, progress=False)
    assert calls == [3]  # the batch once: never retried photo by photo
    assert any(entry.name == "buggy_generate" for entry in info.traceback)  # where the bug is


def test_a_photo_over_the_context_fails_alone_and_its_batch_is_answered(env, tmp_path):
    """A photo whose image tokens + max_new_tokens exceed the model's context (a real model folder with
    a shorter max_position_embeddings): that photo's row gets the error, the others their answers."""
    import shutil

    from PIL import Image

    from riskva_core.evaluate.infer import run_items

    small = env["images"][:2]
    big = tmp_path / "big.jpg"
    with Image.open(env["images"][2]) as img:
        img.resize((img.width * 4, img.height * 4)).save(big, quality=95)
    lengths = {}
    for name, path in (("small", small[0]), ("big", big)):
        enc = env["gen"].processor(text=[env["gen"].prompt], images=[env["gen"].load_image(path.read_bytes(), name)],
                                   return_tensors="pt")
        lengths[name] = int(enc["attention_mask"].sum())
    assert lengths["big"] > max(lengths["small"], 1) + 8  # the big photo has more image tokens
    model = tmp_path / "model"
    shutil.copytree(env["model"], model)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    context = (lengths["small"] + lengths["big"]) // 2 + TOKENS
    for section in (config, config.get("text_config") or {}):
        if "max_position_embeddings" in section:
            section["max_position_embeddings"] = context
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    gen = Generator(model, max_new_tokens=TOKENS)
    recs = run_items(gen, _items([small[0], big, small[1]]), batch_size=3, progress=False)
    assert [("error" in r) for r in recs] == [False, True, False]
    assert recs[1]["error"] == (f"prompt of {lengths['big']} tokens (with the image's) + max_new_tokens {TOKENS} "
                                f"exceeds the model's context of {context} tokens")
    alone = [env["gen"].generate([env["gen"].load_image(p.read_bytes(), str(p))])[0] for p in small]
    assert [recs[0]["raw_output"], recs[2]["raw_output"]] == alone  # same weights, same answers


def test_an_out_of_memory_batch_is_answered_one_photo_at_a_time_and_one_photo_out_of_memory_stops(env, monkeypatch):
    import torch

    from riskva_core.evaluate.infer import run_items

    gen = env["gen"]
    real = gen.model.generate
    calls: list[int] = []

    def batch_too_big(**kwargs):  # what a GPU does when a batch of several photos does not fit (none here)
        calls.append(len(kwargs["input_ids"]))
        if len(kwargs["input_ids"]) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(**kwargs)

    monkeypatch.setattr(gen.model, "generate", batch_too_big)
    paths = env["images"][:3]
    recs = run_items(gen, _items(paths), batch_size=3, progress=False)
    assert calls == [3, 1, 1, 1] and not any("error" in r for r in recs)
    monkeypatch.setattr(gen.model, "generate", real)
    assert [r["raw_output"] for r in recs] == [gen.generate([gen.load_image(p.read_bytes(), str(p))])[0] for p in paths]

    def always(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gen.model, "generate", always)
    with pytest.raises(torch.OutOfMemoryError):  # infrastructure: never a per-row "wrong answer"
        run_items(gen, _items(paths[:1]), batch_size=1, progress=False)
