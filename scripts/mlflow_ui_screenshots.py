"""What a user sees in MLflow's UI, checked in a real browser: serves an MLflow store, opens it in
headless Chromium and clicks through what the README describes, writing three screenshots:

    mlflow-runs.png      runs list (Model training view), the sweep expanded, sweep/score column,
                         sorted by it
    mlflow-charts.png    a training run's Model metrics tab (loss, AP, validation overlays)
    mlflow-compare.png   the sweep's trials compared: swept values against sweep/score

    python scripts/mlflow_ui_screenshots.py demo-output/mlflow.db --out docs/

Not part of the test suite (it needs a browser). Setup, once: `apt-get install -y chromium`
(Debian's; Playwright cannot download its own browser here) and `pip install playwright`. The
store is served by `mlflow server` on a free loopback port, stopped at the end. Each step prints
what it did; a step that cannot find what it clicks stops with the page's screenshot in --out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.mlflow_server import MlflowServer, metrics, tags  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip
VIEWPORT = {"width": 1800, "height": 860}


def _pick_runs(
    server: MlflowServer, experiment_id: str, sweep: str | None, run: str | None
) -> tuple[dict, list[dict], dict]:
    """(the sweep's parent run, its trials best first, a training run) of the experiment."""
    runs = server.search_runs(experiment_id, order_by=["attributes.start_time DESC"])
    parents = [
        r
        for r in runs
        if "sweep_dir" in tags(r) and (sweep is None or r["info"]["run_name"] == sweep)
    ]
    if not parents:
        raise SystemExit(f"no sweep{' ' + sweep if sweep else ''} in the experiment")
    parent = parents[0]
    trials = [r for r in runs if tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]]
    mode = next((p["value"] for p in parent["data"]["params"] if p["key"] == "mode"), "max")
    trials.sort(key=lambda r: metrics(r).get("sweep/score", float("nan")), reverse=mode == "max")
    training = [r for r in runs if "mlflow.parentRunId" not in tags(r) and "sweep_dir" not in tags(r)
                and "run_dir" in tags(r) and (run is None or r["info"]["run_name"] == run)]  # fmt: skip
    if not training:
        raise SystemExit(f"no training run{' ' + run if run else ''} in the experiment")
    return parent, trials, training[0]


def _settle(page, seconds: float = 3.0) -> None:
    """Lets the page finish drawing (charts animate in; the UI polls, so the network is never
    idle)."""
    time.sleep(seconds)


def _save(page, out: Path, height: int | None = None) -> None:
    """The page (its top `height` pixels) as a 256-colour PNG: UI screenshots stay sharp and small."""
    from PIL import Image

    clip = (
        {"x": 0, "y": 0, "width": page.viewport_size["width"], "height": height} if height else None
    )
    page.screenshot(path=str(out), clip=clip)
    Image.open(out).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
        out, optimize=True
    )
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


def _close_assistant(page) -> None:
    """MLflow 3.17 opens its Assistant panel on the right; close it for a wider table."""
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count():
        close.first.click()
        time.sleep(0.5)


def _add_columns(page, names: list[str]) -> None:
    """Columns -> search each name -> tick it."""
    page.get_by_role("button", name="Columns", exact=True).click()
    search = page.get_by_placeholder("Search columns")
    for name in names:
        search.fill(name)
        time.sleep(1)
        page.get_by_role("menuitemcheckbox", name=name, exact=True).or_(
            page.get_by_text(name, exact=True)
        ).last.click()
    page.keyboard.press("Escape")


def _widen_run_names(page, pixels: int = 80) -> None:
    """Drags the Run Name column's edge: trial names are longer than its default width."""
    header = page.locator('.ag-header-cell[col-id="attributes.`Run Name`"]')
    box = header.bounding_box()
    page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] + pixels, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()


def runs_list(
    page, base: str, experiment_id: str, parent: dict, trials: list[dict], out: Path
) -> None:
    """The runs list, the sweep expanded, with the columns sweep/score and the swept values added.
    (Sorting by sweep/score ranks the runs as `runs compare` does, but shows them flat.)"""
    page.goto(f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    page.get_by_text(parent["info"]["run_name"], exact=True).first.wait_for()
    _settle(page)
    _close_assistant(page)
    page.locator('[data-component-id*="runnamecellrenderer"]').first.click()  # the sweep's [+]
    _settle(page, 1)
    swept = sorted(
        {p["key"] for t in trials for p in t["data"]["params"] if p["key"].startswith("sweep.")}
    )
    _add_columns(page, ["sweep/score", *swept])
    _widen_run_names(page)
    page.mouse.move(5, 5)  # no tooltip
    _settle(page, 2)
    _save(page, out, height=480)


def _show_overlays(page, step: int) -> None:
    """Each overlay card (the only cards shown while searching 'overlay'): Configure -> hide the
    run's parameters (the card lists all ~150 of them above the image) and show `step`."""
    page.get_by_placeholder("Search metric charts").fill("overlay")
    _settle(page, 2)
    menus = page.locator('[data-testid="experiment-view-compare-runs-card-menu"]')
    for i in range(menus.count()):
        menus.nth(i).click()
        page.get_by_role("menuitem", name="Configure").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Show run parameters").click()
        step_box = dialog.locator('input[type="number"]')
        step_box.fill(str(step))
        step_box.press("Enter")
        dialog.get_by_role("button", name="Save changes").click()
        _settle(page, 1)


def run_charts(page, base: str, experiment_id: str, run: dict, out: Path) -> None:
    """A training run's Model metrics tab, filtered (the search box takes a regular expression) to
    its training loss, mask AP and the validation overlays (ground truth | prediction) at the last
    validation."""
    page.set_viewport_size({"width": VIEWPORT["width"], "height": 1400})
    page.goto(
        f"{base}/#/experiments/{experiment_id}/runs/{run['info']['run_id']}/model-metrics?workflowType=machine_learning"
    )
    page.get_by_text("Model metrics").first.wait_for()
    _settle(page, 4)
    _close_assistant(page)
    history = _history(page, base, run, "val/segm/AP")
    if history:
        _show_overlays(page, int(max(m["step"] for m in history)))
        page.get_by_placeholder("Search metric charts").fill("train/loss$|segm/AP$|overlay")
    else:  # a run without data.val_shards: its training loss only
        print(f"training run {run['info']['run_name']} has no validation (no val/segm/AP history): "
              "its charts show the training loss only, no AP and no overlays")  # fmt: skip
        page.get_by_placeholder("Search metric charts").fill("train/loss$")
    page.mouse.move(5, 5)
    _settle(page, 6)  # the overlays load
    _save(page, out)
    page.set_viewport_size(VIEWPORT)


def _history(page, base: str, run: dict, key: str) -> list[dict]:
    response = page.request.get(
        f"{base}/api/2.0/mlflow/metrics/get-history",
        params={"run_id": run["info"]["run_id"], "metric_key": key},
    )
    return response.json().get("metrics", [])


def _choose(page, select, values: list[str]) -> None:
    """Picks `values` in one of the compare view's multi-selects (type, Enter)."""
    select.click()
    for value in values:
        page.keyboard.type(value)
        time.sleep(0.5)
        page.keyboard.press("Enter")
    page.keyboard.press("Escape")


def compare(page, base: str, experiment_id: str, trials: list[dict], out: Path) -> None:
    """The trials' compare view: parallel coordinates of the swept values and sweep/score."""
    ids = ",".join(f'"{t["info"]["run_id"]}"' for t in trials)
    page.goto(
        f'{base}/#/compare-runs?runs=[{ids}]&experiments=["{experiment_id}"]&workflowType=machine_learning'
    )
    page.get_by_text("Parallel Coordinates Plot").first.wait_for()
    _settle(page, 2)
    page.get_by_role("button", name="Clear All").click()
    selects = page.locator('[role="tabpanel"] .du-bois-light-select')
    swept = sorted(
        {p["key"] for t in trials for p in t["data"]["params"] if p["key"].startswith("sweep.")}
    )
    _choose(page, selects.nth(0), swept)
    _choose(page, selects.nth(1), ["sweep/score"])
    page.mouse.move(5, 5)
    _settle(page, 3)
    _save(page, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", help="the store: a sqlite file (mlflow.db) or its sqlite:/// URI")
    p.add_argument("--out", default="docs", help="folder of the screenshots (default docs/)")
    p.add_argument("--experiment", default="tensormask")
    p.add_argument("--sweep", help="the sweep's name (default: the newest)")
    p.add_argument("--run", help="the training run's name (default: the newest)")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    uri = (
        args.store
        if args.store.startswith("sqlite:")
        else f"sqlite:///{Path(args.store).resolve()}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(uri, Path(tempfile.mkdtemp(prefix="mlflow-ui-"))).start()
    try:
        experiment_id = server.experiment(args.experiment)["experiment_id"]
        parent, trials, training = _pick_runs(server, experiment_id, args.sweep, args.run)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(180_000)  # a loaded 2-core machine draws slowly
            failed = []
            for name, step in (
                (
                    "mlflow-runs.png",
                    lambda f: runs_list(page, server.url, experiment_id, parent, trials, f),
                ),
                (
                    "mlflow-charts.png",
                    lambda f: run_charts(page, server.url, experiment_id, training, f),
                ),
                (
                    "mlflow-compare.png",
                    lambda f: compare(page, server.url, experiment_id, trials, f),
                ),
            ):
                try:
                    step(out / name)
                except Exception as e:  # the other screenshots are still taken
                    page.screenshot(path=str(out / f"failed-{name}"))
                    print(f"failed on {name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"the page is in {out / f'failed-{name}'}", file=sys.stderr)  # fmt: skip
                    failed.append(name)
                    page.set_viewport_size(VIEWPORT)
            browser.close()
        if failed:
            return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
