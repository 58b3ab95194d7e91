"""The ``k8s`` launcher through dagster-k8s's real ``PipesK8sClient``, with Kubernetes replaced at the API
client only (``kubernetes.client.CoreV1Api``): a fake kubelet that records the pod it is asked to create and,
when told to, runs the pod's container command here as a process with the pod's environment.

- the pod ``launch`` submits is the pod ``render_training_pod`` renders (one builder for both);
- a rank that writes a tqdm progress bar (carriage returns, no newline) to the pod's log between its Pipes
  messages loses none of them: they travel in a file of their own on the shared data root."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import dagster as dg
import kubernetes
import pytest

from riskva_assets.launch_resources import TrainingLauncher, launch, render_training_pod

REPO = Path(__file__).resolve().parents[2]


class FakeKubelet:
    """What PipesK8sClient calls on ``CoreV1Api``: create, list (status), delete, logs."""

    pods: dict[str, tuple[kubernetes.client.V1Pod, subprocess.Popen | None, Path | None]] = {}
    run_containers = False
    logs_dir: Path = Path("/nonexistent")

    def __init__(self, api_client=None):
        pass

    def create_namespaced_pod(self, namespace, body):
        container = body.spec.containers[0]
        proc = log = None
        if self.run_containers:
            log = self.logs_dir / f"{body.metadata.name}.log"
            env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **{e.name: e.value for e in container.env}}
            with open(log, "wb") as out:  # the pod log: stdout and stderr of the container, as kubectl shows it
                proc = subprocess.Popen(container.command, env=env, cwd=REPO, stdout=out, stderr=out)
        FakeKubelet.pods[body.metadata.name] = (body, proc, log)
        return body

    def list_namespaced_pod(self, namespace, field_selector):
        name = field_selector.split("=", 1)[1]
        body, proc, _ = FakeKubelet.pods[name]
        m = kubernetes.client
        code = proc.poll() if proc else 0
        state = (m.V1ContainerState(running=m.V1ContainerStateRunning()) if code is None else
                 m.V1ContainerState(terminated=m.V1ContainerStateTerminated(exit_code=code)))
        status = m.V1ContainerStatus(name=body.spec.containers[0].name, image="", image_id="", ready=code is None,
                                     restart_count=0, state=state)
        pod = m.V1Pod(metadata=body.metadata, spec=body.spec, status=m.V1PodStatus(container_statuses=[status]))
        return m.V1PodList(items=[pod])

    def read_namespaced_pod_log(self, name, namespace, **kwargs):
        log = FakeKubelet.pods[name][2]
        return log.read_text(errors="replace") if log else ""

    def delete_namespaced_pod(self, name, namespace, **kwargs):
        proc = FakeKubelet.pods[name][1]
        if proc and proc.poll() is None:  # Kubernetes: SIGTERM, then the grace period
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture
def kubelet(monkeypatch, tmp_path):
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", FakeKubelet)
    monkeypatch.setattr(kubernetes.config, "load_kube_config", lambda *a, **k: None)  # no kubeconfig here
    monkeypatch.setattr(FakeKubelet, "pods", {})
    monkeypatch.setattr(FakeKubelet, "logs_dir", tmp_path)
    monkeypatch.setattr(FakeKubelet, "run_containers", False)
    return FakeKubelet


def _materialize(command: list[str], launcher: TrainingLauncher, extra_env: dict[str, str]):
    @dg.asset
    def trained(context):
        invocation = launch(context, launcher, command, extra_env)
        results = invocation.get_results()
        return results[0] if results else dg.MaterializeResult(metadata={"reported": False})

    with dg.instance_for_test() as instance:
        result = dg.materialize([trained], instance=instance)
        messages = [e.user_message for e in instance.all_logs(result.run_id)]
    return result, messages


def _decode(value: str) -> dict:
    return json.loads(zlib.decompress(base64.b64decode(value)).decode())


def test_the_pod_launch_submits_is_the_pod_render_training_pod_renders(kubelet, tmp_path):
    launcher = TrainingLauncher(launcher="k8s", num_processes=8, extra_env={"NCCL_DEBUG": "WARN"})
    args = ["--model_name_or_path", "/data/m", "--output_dir", str(tmp_path / "out")]
    pinned = {"RISKVA_PINNED_MODELS": json.dumps({"/data/m": "/data/pinned"})}
    result, _ = _materialize(launcher.command(args), launcher, pinned)
    assert result.success
    ((name, (submitted, _, _)),) = kubelet.pods.items()
    env = {e.name: e.value for e in submitted.spec.containers[0].env}
    pipes_env = {k: v for k, v in env.items() if k.startswith("DAGSTER_PIPES_")}
    rendered = render_training_pod(launcher, args, pipes_env, pinned, pod_name=name)
    api = kubernetes.client.ApiClient()
    assert api.sanitize_for_serialization(rendered) == api.sanitize_for_serialization(submitted)
    # what makes it the training pod: the run's own environment (the pinned model), the launcher's, the
    # manifest's, the rank entry, and Pipes messages in a file on the shared data root, not the pod log
    assert env["RISKVA_PINNED_MODELS"] == pinned["RISKVA_PINNED_MODELS"] and env["NCCL_DEBUG"] == "WARN"
    assert env["RISKVA_HOME"] == "/data/riskva_home" and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in env
    assert "riskva_assets.pipes_rank" in submitted.spec.containers[0].command
    messages = _decode(env["DAGSTER_PIPES_MESSAGES"])
    assert Path(messages["path"]).parent == tmp_path / "out" / "pipes"


# A rank 0 as the pod runs it: a tqdm bar on stderr (\r, no newline) written between its Pipes messages.
RANK = """
import sys
from dagster_pipes import open_dagster_pipes
from tqdm import tqdm

with open_dagster_pipes() as pipes:
    bar = tqdm(total=3, file=sys.stderr, mininterval=0, ascii=True)
    for step in range(1, 4):
        bar.update(1)
        sys.stderr.write("\\r progress %d/3" % step)  # mid-line when the message is written
        sys.stderr.flush()
        pipes.log.info("step %d: loss=%.2f" % (step, 1.0 / step))
    bar.close()
    pipes.report_asset_materialization(metadata={"step": 3, "train_loss": 0.33}, data_version="v3")
"""


def test_pipes_messages_survive_a_progress_bar_in_the_pod_log(kubelet, tmp_path):
    kubelet.run_containers = True
    launcher = TrainingLauncher(launcher="k8s", num_processes=1)
    command = [sys.executable, "-c", RANK, "--output_dir", str(tmp_path / "out")]
    result, messages = _materialize(command, launcher, {})
    assert result.success
    (mat,) = result.asset_materializations_for_node("trained")
    assert mat.metadata["step"].value == 3 and mat.metadata["train_loss"].value == 0.33
    assert [m for m in messages if m.startswith("step ")] == ["step 1: loss=1.00", "step 2: loss=0.50",
                                                               "step 3: loss=0.33"]
    # The bar really was there, mid-line, in the log the pod shares between its ranks.
    ((_, (_, _, log)),) = kubelet.pods.items()
    text = log.read_bytes()
    assert b"\r progress 2/3" in text and b"3/3" in text and b"__dagster_pipes_version" not in text
