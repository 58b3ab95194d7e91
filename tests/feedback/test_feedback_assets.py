"""The feedback assets in Dagster, in process: a day's traces → inference_log → production_drift (its
WARN check fires on altered photos, plots inline) → review_queue; and a review desk that does not
answer: labelstudio_tasks fails with one line and keeps the queue, the sensor skips with the reason,
and the token never shows in the resource's repr. The real Label Studio is test_field_loop.py's."""
from __future__ import annotations

import dagster as dg
from feedback_fixtures import DAY1_NS, answer, closed_port, mlflow_env  # noqa: F401 (fixture)
from model_fixtures import make_prepared_dataset
from PIL import ImageEnhance

from conftest import image_bytes, textured_image
from riskva_assets.feedback_assets import inference_log, production_drift, review_queue
from riskva_assets.resources import DataRootResource, MlflowResource
from riskva_assets.review_assets import LabelStudioResource, labelstudio_tasks, review_progress_sensor
from riskva_core.paths import DataRoot
from riskva_core.registry.tracing import FieldTracer, TracingConfig

DAY = "2025-03-04"


def _altered(i: int) -> bytes:
    return image_bytes(ImageEnhance.Brightness(textured_image(i, (160, 120))).enhance(0.25))


def test_a_days_traces_become_the_log_the_drift_and_the_queue_and_a_down_desk_keeps_it(tmp_path, mlflow_env):
    import dataclasses

    root = DataRoot(tmp_path / "home")
    tracer = FieldTracer(TracingConfig(tracking_uri=root.mlflow_tracking_uri, photo_dir=root.field_photos,
                                       artifact_root=str(root.mlflow_artifact_root)))
    for i in range(16):
        a = answer(i, parse_ok=i % 5 != 0)
        tracer.record(dataclasses.replace(a, photo=_altered(i)) if i >= 8 else a)
    assert tracer.flush(120) and tracer.written == 16, tracer.gaps()
    tracer.close()
    reference = make_prepared_dataset(tmp_path / "reference", n=40)
    paths = DataRootResource(root=str(root.root))
    desk = LabelStudioResource(url=f"http://127.0.0.1:{closed_port()}", api_key="secret-token-value",
                               document_root=str(root.root))
    resources = {"paths": paths, "mlflow": MlflowResource(paths=paths), "labelstudio": desk}
    config = {"ops": {"production_drift": {"config": {"reference_dir": str(reference)}},
                      "review_queue": {"config": {"reference_dir": str(reference), "size": 6}}}}
    with dg.instance_for_test() as instance:
        result = dg.materialize([inference_log, production_drift, review_queue], partition_key=DAY, instance=instance,
                                resources=resources, run_config=config)
        assert result.success
        assert result.asset_materializations_for_node("inference_log")[0].metadata["dagster/row_count"].value == 16
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert not checks["no_drift"].passed and checks["no_drift"].severity == dg.AssetCheckSeverity.WARN
        drift = result.asset_materializations_for_node("production_drift")[0].metadata
        assert "brightness" in drift["drifted"].value and "data:image/png;base64," in drift["plots"].value
        queue = root.field_dir / "review_queue" / f"{DAY}.json"
        assert result.asset_materializations_for_node("review_queue")[0].metadata["dagster/row_count"].value == 6
        before = queue.read_bytes()

        sent = dg.materialize([labelstudio_tasks], partition_key=DAY, instance=instance, resources=resources,
                              raise_on_error=False)
        assert not sent.success
        failure = next(e for e in sent.all_events if e.event_type_value == "STEP_FAILURE")
        message = failure.event_specific_data.error.to_string()
        assert "unreachable" in message and "kept for the next try" in message and "secret-token-value" not in message
        assert queue.read_bytes() == before and not queue.with_name(f"{DAY}.sent.json").exists()

        with dg.build_sensor_context(instance=instance, resources={"labelstudio": desk}) as context:
            skipped = review_progress_sensor(context)
        assert isinstance(skipped, dg.SkipReason) and "unreachable" in skipped.skip_message
    assert "secret-token-value" not in repr(desk) and "secret-token-value" not in str(desk)
