"""The MLflow UI after a small experiment, driven in a real headless Chromium the way a person uses it:
experiments named per table, the run named like `table2/4-64-2-2/uniform`, its metrics (table and charts
by step) and the sample grid among its artifacts.

Needs Debian's `chromium` and `chromium-driver` and the PyPI package `selenium`; skipped without them.
Screenshots go to the test's tmp dir, and also to $TARFLOW_UI_SCREENSHOTS if set (a directory)."""

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from conftest import run_main
from devservers import start_mlflow_server
from mlflow.tracking import MlflowClient
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TABLE2 = str(ROOT / "experiments" / "table2.yaml")
TEST = ["scale=test", "train.steps=10", "train.log_every=2", "cluster.num_workers=1",
        # periodic evaluation at steps 5 and 10 (the image slider), system metrics every second
        "eval.every_steps=5", "eval.periodic_val_images=16", "eval.periodic_samples=4",
        "tracking.system_metrics_interval=1"]
RUN_NAME = "table2/4-64-2-2/uniform"
CHROMIUM = os.environ.get("TARFLOW_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TARFLOW_CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")
WAIT_S = 90  # the UI's first load compiles a large bundle; slow on a busy 2-core machine

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"no headless browser: {CHROMIUM} and {CHROMEDRIVER} are needed "
                "(apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def tracked_experiment(tmp_path_factory, local_ray):
    """A tiny Table 2 run, tracked in an `mlflow server` of its own (so 'table2' holds just this run), trained
    in this process on the session's Ray."""
    from orchestrator.run import main

    work = tmp_path_factory.mktemp("ui")
    server = start_mlflow_server(work / "mlflow")
    try:
        r = run_main(main, [TABLE2, *TEST, f"tracking.uri={server.url}"], work)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        client = MlflowClient(server.url)
        run = client.search_runs([client.get_experiment_by_name("table2").experiment_id],
                                 filter_string=f"attributes.run_name = '{RUN_NAME}'")[0]
        with Image.open(client.download_artifacts(run.info.run_id, "samples/samples.png", str(work))) as grid:
            size = grid.size
        table = client.search_runs([run.info.experiment_id], filter_string="attributes.run_name = 'table2/table'")[0]
        yield {"url": server.url, "samples_size": size, "experiment_id": run.info.experiment_id,
               "run_id": run.info.run_id, "table_run_id": table.info.run_id,
               "system": sorted(k for k in run.data.metrics if k.startswith("system/"))}
    finally:
        server.stop()


@pytest.fixture
def browser(tmp_path):
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1600,1000",
                f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-', dir=tmp_path)}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no Selenium Manager download
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def page_text(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''") or ""


def wait_for_text(driver, *texts, timeout=WAIT_S):
    try:
        WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: all(t in page_text(d) for t in texts))
    except WebDriverException:
        shows = page_text(driver)[:3000]
        raise AssertionError(f"{texts} not shown at {driver.current_url}; the page shows:\n{shows}") from None


def click(driver, locator, timeout=WAIT_S):
    """Click the first visible element found by locator, once it is there."""
    def find(d):
        return next((e for e in d.find_elements(*locator) if e.is_displayed()), False)

    try:
        element = WebDriverWait(driver, timeout, poll_frequency=0.5).until(find)
    except WebDriverException:
        shows = page_text(driver)[:3000]
        raise AssertionError(f"no {locator} at {driver.current_url}; the page shows:\n{shows}") from None
    element.click()


def by_text(text):
    return By.XPATH, f"//*[normalize-space(text())='{text}']"


def screenshot(driver, tmp_path, name):
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    if os.environ.get("TARFLOW_UI_SCREENSHOTS"):
        out = Path(os.environ["TARFLOW_UI_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)
    return path


@pytest.mark.slow
def test_mlflow_ui_shows_the_run_its_metric_charts_and_samples(tracked_experiment, browser, tmp_path):
    d = browser
    started = time.time()
    d.get(f"{tracked_experiment['url']}/#/experiments")
    wait_for_text(d, "Experiments", "table2")
    for button in d.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):  # the assistant side panel
        if button.is_displayed():
            button.click()
    # MLflow 3 opens on its GenAI views; training runs live under "Model training"
    if d.find_elements(*by_text("Model training")):
        click(d, by_text("Model training"))
    click(d, (By.LINK_TEXT, "table2"))

    # the experiment's runs: the training run, named after table / architecture / noise, and the table run
    wait_for_text(d, RUN_NAME, "table2/table")
    screenshot(d, tmp_path, "mlflow-runs")
    click(d, (By.LINK_TEXT, RUN_NAME))

    # the run's overview: final metrics and the resolved config as params
    wait_for_text(d, RUN_NAME, "Metrics", "bpd", "loss", "Parameters", "model.arch", "4-64-2-2")
    screenshot(d, tmp_path, "mlflow-run")

    # metric charts by step (drawn as they come into view; the periodic section comes first: a taller window)
    d.set_window_size(1600, 2600)
    click(d, by_text("Model metrics"))
    wait_for_text(d, "bpd", "loss", "grad_norm", "Step", f"{RUN_NAME} (loss)")
    assert d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot, canvas, svg.main-svg"), "no chart drawn"
    screenshot(d, tmp_path, "mlflow-metrics")

    # the sample grid among the artifacts, previewed as an image
    click(d, by_text("Artifacts"))
    wait_for_text(d, "samples", "config", "metrics")
    click(d, by_text("samples"))
    wait_for_text(d, "samples.png")
    click(d, by_text("samples.png"))
    wait_for_text(d, "samples/samples.png", "Path: mlflow-artifacts:/")
    # the preview is the logged PNG itself (fetched by the UI through the server), drawn at its own size
    width, height = tracked_experiment["samples_size"]
    shown = "return Array.from(document.images).map(i => [i.src.slice(0, 5), i.naturalWidth, i.naturalHeight])"
    try:
        WebDriverWait(d, WAIT_S, poll_frequency=0.5).until(
            lambda x: ["blob:", width, height] in x.execute_script(shown))
    except WebDriverException:
        raise AssertionError(f"no {width}x{height} preview of samples.png; images: {d.execute_script(shown)}") from None
    screenshot(d, tmp_path, "mlflow-samples")
    print(f"UI walk-through in {time.time() - started:.1f}s; screenshots in {tmp_path}")


def scroll_everything_down(driver, times=4):
    """The run page draws its chart cards lazily, as they scroll into view."""
    for _ in range(times):
        driver.execute_script("document.querySelectorAll('*').forEach(e => {"
                              " if (e.scrollHeight > e.clientHeight + 50) e.scrollTop = e.scrollHeight; })")
        time.sleep(1)


@pytest.mark.slow
def test_mlflow_ui_plays_the_sample_grids_and_shows_system_metrics_and_the_table(tracked_experiment, browser,
                                                                                 tmp_path):
    d, t = browser, tracked_experiment
    run_page = f"{t['url']}/#/experiments/{t['experiment_id']}/runs"
    started = time.time()

    # Model metrics: the periodic curves, and the time-stepped sample grids with a step slider over 5 and 10
    d.set_window_size(1600, 2600)
    d.get(f"{run_page}/{t['run_id']}/model-metrics")
    wait_for_text(d, "periodic", f"{RUN_NAME} (periodic/bpd)")
    scroll_everything_down(d)
    wait_for_text(d, "samples")
    (slider,) = [s for s in d.find_elements(By.CSS_SELECTOR, "[role=slider]") if s.is_displayed()]
    assert (slider.get_attribute("aria-valuemin"), slider.get_attribute("aria-valuemax")) == ("5", "10")
    shown = ("return Array.from(document.images).filter(i => i.src.includes('get-artifact') && i.naturalWidth > 0)"
             ".map(i => decodeURIComponent(i.src).split('+step+')[1].split('+')[0])")
    steps = []
    slider.click()
    for _ in range(2):  # the slider opens at step 0; each arrow moves to the next logged step
        slider.send_keys(Keys.ARROW_RIGHT)
        step = slider.get_attribute("aria-valuenow")
        WebDriverWait(d, WAIT_S, poll_frequency=0.5).until(lambda x: step in x.execute_script(shown))
        steps.append(step)
    assert steps == ["5", "10"], steps
    screenshot(d, tmp_path, "mlflow-image-slider")

    # System metrics: a chart per metric of the node, named system/<node>/...
    assert any(k.endswith("/cpu_utilization_percentage") for k in t["system"]), t["system"]
    node = t["system"][0].split("/")[1]
    d.get(f"{run_page}/{t['run_id']}/system-metrics")
    # the chart's legend reads "RUN (system/...)" over a line, or the run's name alone over a single sample
    wait_for_text(d, f"system/{node}", "cpu_utilization_percentage", RUN_NAME)
    try:  # drawn a moment after the section's text
        WebDriverWait(d, WAIT_S, poll_frequency=0.5).until(
            lambda x: x.find_elements(By.CSS_SELECTOR, ".js-plotly-plot, canvas, svg.main-svg"))
    except WebDriverException:
        raise AssertionError(f"no system metrics chart drawn; the page shows:\n{page_text(d)[:3000]}") from None
    screenshot(d, tmp_path, "mlflow-system-metrics")

    # the paper's table, logged as an MLflow table: the artifact view draws it as a table
    d.get(f"{run_page}/{t['table_run_id']}/artifacts")
    click(d, by_text("table"))
    click(d, by_text("table.json"))
    wait_for_text(d, "table/table.json", "View as table", "TarFlow (ours)", "Flow++")
    headers = [h.text for h in d.find_elements(By.CSS_SELECTOR, "[role=columnheader], th") if h.text]
    assert {"model", "metric", "paper", "ours"} <= set(headers), headers
    screenshot(d, tmp_path, "mlflow-table")
    print(f"UI walk-through in {time.time() - started:.1f}s; screenshots in {tmp_path}")
