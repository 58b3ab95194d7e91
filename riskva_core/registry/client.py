"""The MLflow model registry as RisKVA uses it: one registered model, two aliases.

* every trained model is logged as the pyfunc of ``pyfunc.py`` and registered as
  a new version of ``riskva``; the newest gets the alias ``challenger``;
* ``champion`` is the version that serves (``models:/riskva@champion``); the one
  it replaced keeps ``previous_champion`` so a rollback needs no bookkeeping;
* lineage (dataset version, data hashes, Dagster run, code version, git commit)
  and every promotion decision are version tags, so the registry alone answers
  "where did this model come from and why is it serving".

Defaults keep everything under the data root: a sqlite backend and a local
artifact folder, which ``mlflow ui`` can open directly (see paths.py).
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any, Mapping

from riskva_core.errors import RiskvaError

MODEL_NAME = "riskva"
EXPERIMENT_NAME = "riskva"
ALIAS_CHALLENGER = "challenger"
ALIAS_CHAMPION = "champion"
ALIAS_PREVIOUS = "previous_champion"
# MLflow rejects longer model-version tag values.
MAX_TAG_VALUE = 5000


@dataclasses.dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    model_uri: str  # models:/<name>/<version>
    run_id: str
    model_id: str | None
    source: str


def tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= MAX_TAG_VALUE else text[: MAX_TAG_VALUE - 1] + "…"


@dataclasses.dataclass(frozen=True)
class Registry:
    """Connection settings; every method opens its own client (safe across processes)."""

    tracking_uri: str
    registry_uri: str | None = None
    artifact_root: str | None = None  # folder or URI; used when the experiment is created
    model_name: str = MODEL_NAME
    experiment_name: str = EXPERIMENT_NAME
    ui_url: str = "http://127.0.0.1:5000"

    @classmethod
    def under(cls, data_root: Any, **kwargs: Any) -> "Registry":
        """The default sqlite + local-artifacts registry of a ``paths.DataRoot``."""
        data_root.mlflow_dir.mkdir(parents=True, exist_ok=True)
        return cls(
            tracking_uri=data_root.mlflow_tracking_uri,
            artifact_root=str(data_root.mlflow_artifact_root),
            **kwargs,
        )

    # --- plumbing --------------------------------------------------------
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri or self.tracking_uri)

    def activate(self) -> str:
        """Point the mlflow fluent API here; create the experiment if needed; return its id."""
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.registry_uri or self.tracking_uri)
        client = self.client()
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.artifact_root:
            root = self.artifact_root
            location = root if "://" in root else Path(root).resolve().as_uri()
        try:
            return client.create_experiment(self.experiment_name, artifact_location=location)
        except Exception:
            # Another process created it between our lookup and create.
            exp = client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                raise
            return exp.experiment_id

    def model_uri(self, version_or_alias: str) -> str:
        if str(version_or_alias).isdigit():
            return f"models:/{self.model_name}/{version_or_alias}"
        return f"models:/{self.model_name}@{version_or_alias}"

    def version_url(self, version: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/models/{self.model_name}/versions/{version}"

    # --- logging ---------------------------------------------------------
    def log_model(
        self,
        model_dir: str | Path,
        *,
        example_image: bytes,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        extra_artifacts: Mapping[str, str | Path] | None = None,
        run_name: str | None = None,
        model_config: Mapping[str, Any] | None = None,
        pip_requirements: list[str] | None = None,
    ) -> RegisteredVersion:
        """Log ``model_dir`` as the RisKVA pyfunc, register a new version, tag it.

        MLflow checks the input example by loading the logged model and predicting
        on it: seconds for the demo model, a few minutes for a 7B model, and a
        proof that the registered artifact serves. The model loads in the loading
        policy's dtype (``model_config["torch_dtype"]``, default auto: a bf16 checkpoint
        stays bf16 on a CPU). The weights are written once, into the artifact store; a
        failed or killed registration leaves no RUNNING run and no partial copy (storage.py).

        The version is self-contained: it carries this checkout's ``riskva_core`` (MLflow
        ``code_paths``; pyfunc.py's entry script runs it instead of whatever riskva_core the
        serving environment has) and pins the installed versions of the distributions that
        code imports (``default_requirements``), so loading version N runs version N's code.
        """
        import mlflow
        from mlflow.models import Model

        from riskva_core.atomic import make_readable
        from riskva_core.model.loading import resolve_dtype
        from riskva_core.registry import pyfunc, storage

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise RiskvaError(f"{model_dir}: not a model folder (no config.json)")
        model_config = {**pyfunc.DEFAULT_MODEL_CONFIG, **(model_config or {})}
        resolve_dtype(model_config["torch_dtype"], "cpu")  # refused here, not as a warning from MLflow's check
        experiment_id = self.activate()
        client = self.client()
        storage.reap_killed_runs(client, experiment_id)
        tags = {k: tag_value(v) for k, v in (tags or {}).items()}
        with tempfile.TemporaryDirectory(prefix="riskva-pyfunc-") as tmp, mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name, tags={**tags, storage.PROCESS_TAG: storage.process_tag()}
        ) as run, storage.failed_run_discarded(client, experiment_id, run.info.run_id):
            if params:
                mlflow.log_params({k: tag_value(v)[:6000] for k, v in params.items()})
            for name, path in (extra_artifacts or {}).items():
                if Path(path).is_file():
                    mlflow.log_artifact(str(path), artifact_path=name)
            info = Model.log(
                artifact_path=None,
                name="model",
                flavor=storage.LinkedWeightsFlavor(model_dir),  # the weights are written once (storage.py)
                python_model=str(pyfunc.code_file(tmp)),
                artifacts={pyfunc.ARTIFACT_MODEL_DIR: str(model_dir)},
                # Every key logged, so `riskva serve --max_*` can override it at load time.
                model_config=model_config,
                signature=pyfunc.signature(),
                input_example=pyfunc.input_example(example_image),
                code_paths=[str(pyfunc.code_package(tmp))],
                pip_requirements=pip_requirements or default_requirements(),
                registered_model_name=self.model_name,
            )
            run_id = run.info.run_id
        version = str(info.registered_model_version)
        self.set_tags(version, tags)
        if (stored := storage.local_model_dir(self.model_uri(version), self.tracking_uri, self.registry_uri)):
            make_readable(stored)  # MLflow's upload copies the source's mode bits; servers may run as another user
        return RegisteredVersion(
            name=self.model_name,
            version=version,
            model_uri=self.model_uri(version),
            run_id=run_id,
            model_id=getattr(info, "model_id", None),
            source=info.model_uri,
        )

    def set_tags(self, version: str, tags: Mapping[str, Any]) -> None:
        client = self.client()
        for key, value in tags.items():
            client.set_model_version_tag(self.model_name, str(version), key, tag_value(value))

    def log_metrics(self, version: str, metrics: Mapping[str, float], prefix: str = "eval.") -> None:
        """Headline metrics on the version: as tags (visible in the registry list) and as
        metrics of the logged model (MLflow 3 shows them on the version page)."""
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self.set_tags(version, {f"{prefix}{k}": f"{v:.6g}" for k, v in clean.items()})
        mv = self.get_version(version)
        client = self.client()
        model_id = getattr(mv, "model_id", None)
        if mv.run_id:
            for key, value in clean.items():
                client.log_metric(mv.run_id, f"{prefix}{key}", value, model_id=model_id)

    # --- lookup and aliases ----------------------------------------------
    def get_version(self, version: str):
        return self.client().get_model_version(self.model_name, str(version))

    def alias_version(self, alias: str) -> str | None:
        """The version an alias points to, or None when unset (or no model registered yet)."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client().get_model_version_by_alias(self.model_name, alias).version)
        except MlflowException:
            return None

    def aliases(self) -> dict[str, str]:
        from mlflow.exceptions import MlflowException

        try:
            rm = self.client().get_registered_model(self.model_name)
        except MlflowException:
            return {}
        return {a: str(v) for a, v in (rm.aliases or {}).items()}

    def set_alias(self, alias: str, version: str) -> None:
        self.client().set_registered_model_alias(self.model_name, alias, str(version))

    def delete_alias(self, alias: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client().delete_registered_model_alias(self.model_name, alias)
        except MlflowException:
            pass


# Loaded by transformers at run time for a Qwen2.5-VL (weights, device map, image processor),
# with no import of them in riskva_core for the import graph to find.
RUNTIME_DISTRIBUTIONS = ("torchvision", "accelerate", "safetensors", "tokenizers", "qwen-vl-utils")


def default_requirements() -> list[str]:
    """``dist==version`` pins, at their installed versions, of every distribution the pyfunc's
    code imports (its import graph, import_graph.py) plus what transformers loads at run time.

    riskva itself is not on an index; the version carries its own riskva_core (code_paths).
    """
    from importlib import metadata

    from riskva_core.import_graph import closure, distributions

    _, external = closure(["riskva_core.registry.pyfunc"])
    pins = []
    for dist in sorted(distributions(external) | set(RUNTIME_DISTRIBUTIONS), key=str.lower):
        try:
            pins.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return pins
