"""``riskva register``: log a merged model folder to MLflow as a new version of ``riskva``.

    riskva register --model_path runs/merged                      # new version, alias challenger
    riskva register --model_path runs/merged --torch_dtype float32 --example_image photo.jpg

The same call as the Dagster asset ``registered_model`` (``Registry.log_model``), for a model
merged by hand. MLflow checks the input example by loading the logged model and answering it; that
load, and every later load of the version (``riskva serve``, ``mlflow.pyfunc.load_model``), uses
the ``torch_dtype`` recorded here in ``model_config`` (default auto: a bf16 checkpoint stays bf16 on
a CPU; the 7B needs 15 GB instead of 33 GB). The weights are written once, into the artifact store.
Registry: ``--tracking_uri``, else ``$RISKVA_MLFLOW_TRACKING_URI``, else the data root's sqlite
registry (``$RISKVA_HOME/mlflow``).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import os
import signal
from pathlib import Path

from riskva_core.errors import RiskvaError
from riskva_core.evaluate.generation import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS

ENV_TRACKING_URI = "RISKVA_MLFLOW_TRACKING_URI"
ENV_REGISTRY_URI = "RISKVA_MLFLOW_REGISTRY_URI"


@dataclasses.dataclass
class RegisterConfig:
    model_path: Path
    example_image: Path | None = None
    torch_dtype: str = "auto"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = DEFAULT_BATCH_SIZE
    alias: str = "challenger"
    run_name: str | None = None
    tracking_uri: str | None = None
    registry_uri: str | None = None

    def __post_init__(self) -> None:
        from riskva_core.model.loading import resolve_dtype

        self.model_path = Path(self.model_path)
        if not (self.model_path / "config.json").is_file():
            raise RiskvaError(f"--model_path {self.model_path}: not a merged model folder (no config.json)")
        if self.example_image is not None and not Path(self.example_image).is_file():
            raise RiskvaError(f"--example_image {self.example_image}: no such file")
        resolve_dtype(self.torch_dtype, "cpu")  # auto|bfloat16|float32; float16 refused with the reason
        for name in ("max_new_tokens", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise RiskvaError(f"--{name} must be >= 1, got {getattr(self, name)}")
        self.tracking_uri = self.tracking_uri or os.environ.get(ENV_TRACKING_URI) or None
        self.registry_uri = self.registry_uri or os.environ.get(ENV_REGISTRY_URI) or None

    def registry(self):
        from riskva_core.paths import DataRoot
        from riskva_core.registry.client import Registry

        if self.tracking_uri is None:
            return Registry.under(DataRoot.from_env(), registry_uri=self.registry_uri)
        return Registry(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)

    def example_bytes(self) -> bytes:
        if self.example_image is not None:
            return Path(self.example_image).read_bytes()
        from PIL import Image, ImageDraw

        # Any photo proves the registered artifact loads and answers; a drawn crack will do.
        img = Image.new("RGB", (224, 224), (196, 196, 190))
        ImageDraw.Draw(img).line([(40, 90), (180, 120)], fill=(40, 40, 40), width=4)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        return buf.getvalue()


def register(cfg: RegisterConfig):
    """Log, register and (unless ``alias`` is empty) alias the model; returns the RegisteredVersion."""
    registry = cfg.registry()
    rv = registry.log_model(
        cfg.model_path,
        example_image=cfg.example_bytes(),
        params={"merged_model": str(cfg.model_path.resolve())},
        extra_artifacts={"merge": cfg.model_path / "merge_report.json"},
        run_name=cfg.run_name or f"register-{cfg.model_path.name}",
        model_config={"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
                      "torch_dtype": cfg.torch_dtype},
    )
    if cfg.alias:
        registry.set_alias(cfg.alias, rv.version)
    return rv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="riskva register",
                                description="Log a merged model folder to the MLflow registry as a new "
                                "version of 'riskva' (the RisKVA pyfunc) and give it an alias.")
    p.add_argument("--model_path", type=Path, required=True, help="merged model folder (riskva merge's output)")
    p.add_argument("--example_image", type=Path, default=None,
                   help="photo for MLflow's input example, which it answers once to prove the artifact serves "
                   "(default: a drawn 224x224 test image)")
    p.add_argument("--torch_dtype", default="auto",
                   help="dtype every load of this version uses, recorded as model_config torch_dtype: auto | "
                   "bfloat16 | float32 (default auto: bf16 on a bf16 GPU; on a CPU the checkpoint's own "
                   "dtype, bf16 for Qwen2.5-VL-7B, when the CPU computes bf16, else float32)")
    p.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"answer length of the served model (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per generate() batch when served: concurrent requests share one (default "
                   f"{DEFAULT_BATCH_SIZE}, as riskva infer)")
    p.add_argument("--alias", default="challenger", help="alias to point at the new version; '' for none "
                   "(default challenger)")
    p.add_argument("--run_name", default=None, help="MLflow run name (default register-<folder name>)")
    p.add_argument("--tracking_uri", default=None,
                   help=f"MLflow tracking/registry URI (default ${ENV_TRACKING_URI}, else "
                   "sqlite:///$RISKVA_HOME/mlflow/mlflow.db with artifacts beside it)")
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    cfg = RegisterConfig(**vars(build_parser().parse_args(argv)))
    # SIGTERM unwinds like Ctrl-C, so the run is ended FAILED and its partial upload deleted.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        rv = register(cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)
    from riskva_core.model.loading import dtype_name, resolve_dtype

    alias = f", alias {cfg.alias}" if cfg.alias else ""
    loads_in = dtype_name(resolve_dtype(cfg.torch_dtype, None, checkpoint=cfg.model_path))  # as the pyfunc does
    print(f"registered {rv.name} version {rv.version} ({rv.model_uri}{alias}; loads in {loads_in} on this host); "
          f"serve it with riskva serve --model_uri {rv.model_uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
