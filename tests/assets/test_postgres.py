"""The whole graph on real PostgreSQL: Dagster's storage (configs/scale_out/dagster_postgres.yaml, via
dagster-postgres) and MLflow's backend store (postgresql+psycopg2:// URI) on a local cluster that the
test starts with Debian's initdb/pg_ctl in a temporary folder on a free port, and stops afterwards."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import dagster as dg
import pytest
from conftest import missing_requirement

from riskva_assets.assets import VERSION_ASSETS
from riskva_assets.partitions import DATASET_VERSION
from riskva_assets.resources import DataRootResource, MlflowResource, TrainingLauncher
from riskva_core.launch.commands import free_port
from riskva_core.synth.generate import synth

REPO = Path(__file__).resolve().parents[2]
VERSION = "v1"
USER = "riskva"


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the package's `postgres` user then."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="module")
def postgres() -> dict[str, str]:
    bin_dir = _bin_dir()
    if bin_dir is None:
        missing_requirement("PostgreSQL binaries absent (/usr/lib/postgresql/*/bin); `make postgres` "
                            "(part of `make test`) installs Debian's postgresql")
    data = Path(tempfile.mkdtemp(prefix="riskva-pg-"))
    if os.geteuid() == 0:
        os.chown(data, pwd.getpwnam("postgres").pw_uid, pwd.getpwnam("postgres").pw_gid)
    port = str(free_port())
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    subprocess.run(_as_server_user([str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", USER, "--auth=trust",
                                    "-E", "UTF8", "--no-locale"]), **run)
    subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "db" / "log"),
                                    "-o", f"-p {port} -h 127.0.0.1 -k {data}", "-w", "start"]), **run)
    try:
        for db in ("dagster", "mlflow"):
            subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", port, "-U", USER, db], **run)
        # The driver named, as in configs/scale_out: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3.
        yield {"port": port, "mlflow": f"postgresql+psycopg2://{USER}:unused@127.0.0.1:{port}/mlflow"}
    finally:
        subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "stop"]),
                       capture_output=True, timeout=120)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_whole_graph_on_postgres(postgres: dict[str, str], tmp_path: Path, monkeypatch):
    import psycopg2

    home = tmp_path / "home"
    synth(home / "datasets" / VERSION, num_images=24, seed=0, image_size=(128, 96), num_workers=1)
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copyfile(REPO / "configs" / "scale_out" / "dagster_postgres.yaml", dagster_home / "dagster.yaml")
    for var, value in {"DAGSTER_PG_USERNAME": USER, "DAGSTER_PG_PASSWORD": "unused", "DAGSTER_PG_HOST": "127.0.0.1",
                       "DAGSTER_PG_DB": "dagster", "DAGSTER_PG_PORT": postgres["port"],
                       "DAGSTER_HOME": str(dagster_home)}.items():
        monkeypatch.setenv(var, value)
    paths = DataRootResource(root=str(home))
    resources = {"paths": paths, "mlflow": MlflowResource(paths=paths, tracking_uri=postgres["mlflow"]),
                 "launcher": TrainingLauncher(num_processes=1, termination_timeout_s=60)}
    run_config = dg.RunConfig(ops={
        "base_model": {"config": {"size": "tiny"}},
        "lora_adapter": {"config": {"recipe": "demo", "max_steps": 1, "per_device_train_batch_size": 2}},
        "registered_model": {"config": {"max_new_tokens": 8, "batch_size": 8}},
        "champion_promotion": {"config": {"min_parse_rate": 0.0, "beat_majority_baseline": False,
                                          "n_resamples": 100}},
    })
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        instance.add_dynamic_partitions(DATASET_VERSION, [VERSION])
        result = dg.materialize(VERSION_ASSETS, partition_key=VERSION, instance=instance, run_config=run_config,
                                resources=resources)
        assert result.success
        assert sorted(e.asset_key.to_user_string() for e in result.get_asset_materialization_events()) == \
            sorted(a.key.to_user_string() for a in VERSION_ASSETS)
        version = result.asset_materializations_for_node("registered_model")[0].metadata["model_version"].value
    connect = dict(host="127.0.0.1", port=int(postgres["port"]), user=USER)
    with psycopg2.connect(dbname="dagster", **connect) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_id = %s", (result.run_id,))
        assert cur.fetchone() == ("SUCCESS",)
    with psycopg2.connect(dbname="mlflow", **connect) as conn, conn.cursor() as cur:
        cur.execute("SELECT version FROM model_versions WHERE name = 'riskva'")
        assert [str(v) for (v,) in cur.fetchall()] == [str(version)]
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = 'riskva' ORDER BY alias")
        assert dict(cur.fetchall())["challenger"] == int(version)
    # Artifacts stay under the data root (a database keeps none).
    assert any((home / "mlflow" / "artifacts").rglob("MLmodel"))
