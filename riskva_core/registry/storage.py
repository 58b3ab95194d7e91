"""Where registered weights live on disk: written once at registration, read in place when served.

A 7B model folder is 16 GB. MLflow's ``Model.log`` would write it twice (a staging copy of the
``model_dir`` artifact in a temporary folder, then the upload of that folder into the artifact
store), and ``mlflow models serve models:/…`` would copy it a third time into a temporary folder
at start-up. Here:

* :class:`LinkedWeightsFlavor` is ``mlflow.pyfunc`` whose staged ``model_dir`` holds symlinks to
  the model folder's files; MLflow's input-example check loads through them and its upload
  follows them, so the weights are written exactly once: into the artifact store.
* :func:`discard_failed_run` ends a registration that failed (exception, Ctrl-C, SIGTERM) as
  FAILED and deletes the weights it had half-uploaded; :func:`reap_killed_runs` does the same for
  a registration that was killed outright (SIGKILL, out of memory), the next time one starts.
* :func:`local_model_dir` finds a ``models:/`` URI's folder when the artifact store is this
  machine's file system, so serving loads it in place; a remote store is still downloaded once.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

from riskva_core.model.resolve import ARTIFACT_MODEL_DIR

# Run tag naming the registering process (host:pid), so a killed registration can be recognised.
PROCESS_TAG = "riskva.register_process"
FAILURE_TAG = "riskva.failure"


class LinkedWeightsFlavor:
    """``mlflow.pyfunc`` for ``Model.log(flavor=…)``, staging ``model_dir`` as symlinks (see module doc).

    ``Model.log`` documents its ``flavor`` as any object with a ``save_model``; this one calls
    ``mlflow.pyfunc.save_model`` with ``config.json`` only, then links the folder's other files in.
    """

    __name__ = "mlflow.pyfunc"

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir).resolve()

    def save_model(self, path: str, mlflow_model: Any, artifacts: dict[str, str], **kwargs: Any) -> None:
        import mlflow

        with tempfile.TemporaryDirectory(prefix="riskva-config-") as tmp:
            config_only = Path(tmp) / ARTIFACT_MODEL_DIR  # MLflow names the staged folder after its source
            config_only.mkdir()
            shutil.copyfile(self.model_dir / "config.json", config_only / "config.json")
            mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model,
                                     artifacts={**artifacts, ARTIFACT_MODEL_DIR: str(config_only)}, **kwargs)
        flavor_artifacts = mlflow_model.flavors["python_function"]["artifacts"][ARTIFACT_MODEL_DIR]
        staged = Path(path) / flavor_artifacts["path"]
        for src in sorted(self.model_dir.rglob("*")):
            rel = src.relative_to(self.model_dir)
            if src.is_file() and rel != Path("config.json"):
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(src, staged / rel)
        flavor_artifacts["uri"] = str(self.model_dir)  # the folder, not the temporary config copy
        mlflow_model.save(str(Path(path) / "MLmodel"))


def process_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _delete_logged_models(client: Any, experiment_id: str, run_id: str) -> int:
    """Delete the artifacts (the half-uploaded weights) of the run's logged models; mark them FAILED."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    n = 0
    for model in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"):
        try:
            get_artifact_repository(model.artifact_location).delete_artifacts()
        except (OSError, NotImplementedError):
            pass
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        n += 1
    return n


def discard_failed_run(client: Any, experiment_id: str, run_id: str, reason: str) -> None:
    """End a failed registration: no RUNNING run and no half-uploaded weights remain."""
    _delete_logged_models(client, experiment_id, run_id)
    client.set_tag(run_id, FAILURE_TAG, reason[:500])
    client.set_terminated(run_id, "FAILED")


@contextlib.contextmanager
def failed_run_discarded(client: Any, experiment_id: str, run_id: str) -> Iterator[None]:
    """Around a registration: any exception (Ctrl-C and Dagster's SIGTERM included) discards the run."""
    try:
        yield
    except BaseException as exc:
        discard_failed_run(client, experiment_id, run_id, f"{type(exc).__name__}: {exc}".splitlines()[0])
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_killed_runs(client: Any, experiment_id: str) -> list[str]:
    """Registrations on this host still RUNNING whose process is gone (killed): discard them."""
    from mlflow.entities import ViewType

    host = socket.gethostname()
    reaped = []
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                              run_view_type=ViewType.ACTIVE_ONLY)
    for run in runs:
        owner = run.data.tags.get(PROCESS_TAG, "")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        discard_failed_run(client, experiment_id, run.info.run_id,
                           f"the registering process {owner} was killed before it finished")
        reaped.append(run.info.run_id)
    return reaped


def local_model_dir(model_uri: str, tracking_uri: str, registry_uri: str | None = None) -> Path | None:
    """The local folder of ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` when its artifacts are on
    this machine's file system (an MLmodel inside); None for other URIs and remote stores."""
    import re
    from urllib.parse import unquote, urlparse

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    match = re.match(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$", model_uri)
    if match is None:
        return None
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
    try:
        version = match["version"] or client.get_model_version_by_alias(match["name"], match["alias"]).version
        location = client.get_model_version_download_uri(match["name"], str(version))
    except MlflowException:
        return None
    parsed = urlparse(location)
    if parsed.scheme not in ("", "file") or (parsed.scheme == "file" and parsed.netloc not in ("", "localhost")):
        return None
    folder = Path(unquote(parsed.path))
    return folder if (folder / "MLmodel").is_file() else None
