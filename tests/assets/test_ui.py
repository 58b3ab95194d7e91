"""The Dagster UI in a real browser (Playwright + Debian's Chromium), as a user meets it.

Setup (module scope): a temporary data root with a 25-row dataset version ``v1`` (24 good
rows, one naming a missing image, so the rejected-rows table is not empty), its Dagster
instance (the repository's dagster.yaml), then

* ``dagster asset materialize --select 'not group:feedback'`` (the version's chain) of ``v1`` on that instance (tiny model, 2 train
  steps, in-process executor) — the "full materialization launched beforehand";
* ``dagster-webserver`` and ``dagster-daemon`` on a free loopback port.

The browser then (1) sees every asset of the chain in the global lineage graph, (2) launches
a materialization of ``raw_metadata``/``v1`` from the asset page and waits for the run to
succeed, (3) reads the ``schema_valid`` result and the rejected-rows table, (4) reads the
evaluation report's markdown on ``evaluation_report``. Screenshots go to test-artifacts/ui/.

Needs /usr/bin/chromium (``make browser`` or ``apt-get install -y chromium``); skipped,
with that message, only when it is absent, and failed instead under ``CI=true``. Never downloads a browser.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import missing_requirement
from servers import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts" / "ui"
VERSION = "v1"
ASSETS = ("raw_metadata", "sft_jsonl", "sft_parquet", "base_model", "lora_adapter", "merged_model",
          "registered_model", "evaluation_report", "champion_promotion")
MISSING_IMAGE = "images/missing_photo.jpg"
# The demo chain at its smallest: tiny model, 2 optimizer steps, short answers, one process.
RUN_CONFIG = f"""\
execution:
  config:
    in_process: {{}}
ops:
  base_model: {{config: {{size: tiny}}}}
  lora_adapter: {{config: {{recipe: demo, max_steps: 2, per_device_train_batch_size: 2}}}}
  registered_model: {{config: {{max_new_tokens: 16, batch_size: 4}}}}
  champion_promotion: {{config: {{min_parse_rate: 0.0, n_resamples: 200}}}}
"""
UI_TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.ui,
    pytest.mark.timeout(1200),
]


@pytest.fixture(scope="module", autouse=True)
def _chromium() -> None:
    """Before the (minutes-long) stack is built: no Chromium skips here and fails under CI=true."""
    if not CHROMIUM.exists():
        missing_requirement("browser tests need Chromium at /usr/bin/chromium: run `make browser` "
                            "or `sudo apt-get install -y chromium`")


def _env(home: Path, dagster_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RISKVA_", "DAGSTER_", "MLFLOW_"))}
    env.update(
        RISKVA_HOME=str(home), DAGSTER_HOME=str(dagster_home), RISKVA_NUM_PROCESSES="1",
        HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
    )
    return env


@contextlib.contextmanager
def _instance(dagster_home: Path):
    """The instance in this process; its dagster.yaml reads DAGSTER_HOME from the environment."""
    import dagster as dg

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(dagster_home))
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            yield instance


def _seed_instance(tmp: Path) -> tuple[Path, Path]:
    """Data root with dataset ``v1`` (+1 bad row) and its Dagster home, partition registered."""
    import dagster as dg

    from riskva_assets.instance import prepare_dagster_home
    from riskva_assets.partitions import DATASET_VERSION
    from riskva_core.paths import DataRoot
    from riskva_core.synth.generate import synth

    root = DataRoot(tmp / "riskva_home")
    csv = synth(root.dataset_dir(VERSION), num_images=24, seed=0, image_size=(128, 96), num_workers=1)
    with csv.open("a", encoding="utf-8") as f:
        f.write(f"bad1,{MISSING_IMAGE},墙面开裂,建议修补,轻微,墙面裂缝\n")
    # The repository's dagster.yaml (nux: enabled: false): no newsletter dialog over the first page.
    dagster_home = prepare_dagster_home(root)
    # Registered before the daemon starts, so the new-dataset sensor has nothing to launch.
    with _instance(dagster_home) as instance:
        instance.add_dynamic_partitions(DATASET_VERSION, [VERSION])
    return root.root, dagster_home


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Seeded instance; the full CLI materialization running; webserver + daemon up."""
    tmp = tmp_path_factory.mktemp("ui")
    home, dagster_home = _seed_instance(tmp)
    env = _env(home, dagster_home)
    (tmp / "run_config.yaml").write_text(RUN_CONFIG, encoding="utf-8")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    full = ServerProcess([BIN / "dagster", "asset", "materialize", "--select", "not group:feedback", "--partition", VERSION,
                          "-m", "riskva_assets.definitions", "-c", tmp / "run_config.yaml"],
                         env=env, cwd=REPO, log=tmp / "materialize.log", name="dagster asset materialize")
    web = ServerProcess([BIN / "dagster-webserver", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                        env=env, cwd=REPO, log=tmp / "webserver.log", name="dagster-webserver")
    daemon = ServerProcess([BIN / "dagster-daemon", "run", "-w", "workspace.yaml"],
                           env=env, cwd=REPO, log=tmp / "daemon.log", name="dagster-daemon")
    try:
        full.start()
        web.start()
        daemon.start()
        web.wait_http(f"{url}/server_info", timeout=240)
        yield {"url": url, "home": home, "dagster_home": dagster_home, "full": full, "daemon": daemon, "web": web}
    finally:
        for proc in (full, daemon, web):
            proc.stop()


@pytest.fixture(scope="module")
def full_run(stack):
    """The beforehand full materialization, finished (successfully)."""
    full: ServerProcess = stack["full"]
    full.wait_until(lambda: not full.alive(), timeout=900, what="finished", interval=2)
    assert full.proc.returncode == 0, full.fail_message("full materialization failed")
    return stack


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True, timeout=120_000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    pg = context.new_page()
    try:
        yield pg
    finally:
        context.close()


def _open(page, url: str) -> None:
    page.goto(url, wait_until="domcontentloaded", timeout=UI_TIMEOUT_MS)


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=False)


def test_asset_graph_shows_every_asset_of_the_chain(stack, page):
    _open(page, f"{stack['url']}/asset-groups")
    page.get_by_text("Global asset lineage").wait_for()
    page.get_by_role("button", name="Materialize all…").wait_for()
    # Groups (data, model, registry) start collapsed: "Expand all groups" is ⌥E on the graph.
    page.get_by_text("registry", exact=True).first.wait_for()
    if not page.get_by_text(ASSETS[-1], exact=True).count():
        page.mouse.click(1000, 200)  # focus the graph canvas (empty area)
        page.keyboard.press("Alt+e")
    for name in ASSETS:
        page.get_by_text(name, exact=True).first.wait_for(state="visible")
    _shot(page, "graph.png")


def test_launch_raw_metadata_from_the_ui_and_wait_for_success(full_run, page):
    import dagster as dg

    url = full_run["url"]
    _open(page, f"{url}/assets/raw_metadata")
    page.get_by_role("button", name="Materialize…").click()
    page.get_by_text("Launch runs to materialize raw_metadata").wait_for()
    page.get_by_text("Select a partition or create one").click()
    page.get_by_role("menuitem", name=VERSION).first.click()  # the partition key (shown twice: label + tooltip)
    page.get_by_text("Launch runs to materialize raw_metadata").click()  # close the partition menu
    page.get_by_role("button", name="Launch 1 run").click()
    toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}")).first
    toast.wait_for()
    short_id = re.search(r"[0-9a-f]{8}", toast.inner_text()).group(0)
    # Follow the run from the Runs list, as a user would.
    _open(page, f"{url}/runs")
    page.locator(f'a[href^="/runs/{short_id}"]').first.click()
    page.wait_for_url(f"**/runs/{short_id}*")
    run_id = page.url.rstrip("/").split("/runs/")[1].split("?")[0]

    # The daemon dequeues the run and a run worker executes it; the page follows live.
    deadline = time.monotonic() + 420
    while not page.get_by_text("RUN_SUCCESS", exact=True).count():
        if page.get_by_text("RUN_FAILURE", exact=True).count():
            _shot(page, "run.png")
            raise AssertionError(f"run {run_id} failed; see test-artifacts/ui/run.png")
        if time.monotonic() > deadline:
            _shot(page, "run.png")
            raise AssertionError(f"run {run_id} did not succeed within 420 s:\n"
                                 + full_run["daemon"].fail_message("daemon"))
        page.wait_for_timeout(2000)
    page.get_by_text("Success", exact=True).first.wait_for()
    _shot(page, "run.png")

    with _instance(full_run["dagster_home"]) as instance:
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags.get("dagster/partition") == VERSION
        assert {k.to_user_string() for k in run.asset_selection or ()} == {"raw_metadata"}


def test_schema_check_result_and_rejected_rows_table(full_run, page):
    url = full_run["url"]
    _open(page, f"{url}/assets/raw_metadata?view=checks")
    page.get_by_text("schema_valid").first.wait_for()
    page.get_by_text("1/25 rows rejected (limit 10%)").first.wait_for()
    page.get_by_text("Passed", exact=True).first.wait_for()
    _shot(page, "checks.png")

    _open(page, f"{url}/assets/raw_metadata")
    row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="rejected_rows", exact=True)).first
    row.wait_for()
    # The markdown table is rendered in the metadata: header, then the one rejected row.
    row.get_by_role("cell", name=MISSING_IMAGE, exact=True).wait_for()
    row.get_by_role("cell", name="image file not found", exact=True).wait_for()
    row.scroll_into_view_if_needed()
    _shot(page, "rejected_rows.png")


def test_evaluation_report_markdown_after_a_full_materialization(full_run, page):
    url = full_run["url"]
    _open(page, f"{url}/assets/evaluation_report")
    row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="report", exact=True)).first
    row.wait_for()
    row.get_by_text("Show Markdown").click()
    dialog = page.locator(".bp5-dialog").filter(has_text="RisKVA evaluation report")
    dialog.wait_for()
    for text in ("Headline", "parse rate (all four fields)", "level accuracy", "Risk level", "Text fields"):
        dialog.get_by_text(text, exact=True).first.wait_for()
    dialog.get_by_text("RisKVA evaluation report", exact=True).first.scroll_into_view_if_needed()
    _shot(page, "report.png")
    # The numbers shown are the ones in report.md on disk (the test split's size, here).
    report_md = (full_run["home"] / "reports" / VERSION / "report" / "report.md").read_text(encoding="utf-8")
    (samples_line,) = [ln for ln in report_md.splitlines() if ln.startswith("| samples |")]
    n = samples_line.split("|")[2].strip()
    assert int(n) > 0
    shown = dialog.get_by_role("row").filter(has=page.get_by_role("cell", name="samples", exact=True)).first
    assert shown.get_by_role("cell").nth(1).inner_text().strip() == n
