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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.mlflow_server import MlflowServer, metrics, tags  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip
VIEWPORT = {"width": 1440, "height": 900}


def _pick_runs(server: MlflowServer, experiment_id: str, sweep: str | None, run: str | None) -> tuple[dict, list[dict], dict]:
    """(the sweep's parent run, its trials best first, a training run) of the experiment."""
    runs = server.search_runs(experiment_id, order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if "sweep_dir" in tags(r) and (sweep is None or r["info"]["run_name"] == sweep)]
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
    """Lets the page finish drawing (charts animate in)."""
    page.wait_for_load_state("networkidle")
    time.sleep(seconds)


def _close_assistant(page) -> None:
    """MLflow 3.17 opens its Assistant panel on the right; close it for a wider table."""
    panel = page.get_by_text("MLflow Assistant", exact=True)
    if panel.count():
        box = panel.first.bounding_box()
        buttons = [b for b in page.get_by_role("button").all() if (bb := b.bounding_box()) and box and abs(bb["y"] - box["y"]) < 20 and bb["x"] > box["x"]]
        if buttons:
            buttons[-1].click()  # the right-most: close
            time.sleep(0.5)


def runs_list(page, base: str, experiment_id: str, parent: dict, out: Path) -> None:
    page.goto(f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    page.get_by_text(parent["info"]["run_name"], exact=True).first.wait_for()
    _settle(page)
    _close_assistant(page)
    # expand the sweep: the +/- button in front of its name
    row = page.get_by_role("row").filter(has_text=parent["info"]["run_name"]).first
    row.get_by_role("button").first.click()
    _settle(page, 1)
    # Columns -> sweep/score
    page.get_by_role("button", name="Columns").click()
    page.get_by_placeholder("Search columns").fill("sweep/score")
    page.get_by_text("sweep/score", exact=True).last.click()
    page.keyboard.press("Escape")
    _settle(page, 1)
    page.screenshot(path=str(out))
    print(f"wrote {out}")


def run_charts(page, base: str, experiment_id: str, run: dict, out: Path) -> None:
    page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run['info']['run_id']}/model-metrics?workflowType=machine_learning")
    page.get_by_text("Model metrics").first.wait_for()
    _settle(page, 6)
    _close_assistant(page)
    _settle(page, 2)
    page.screenshot(path=str(out))
    print(f"wrote {out}")


def compare(page, base: str, experiment_id: str, trials: list[dict], out: Path) -> None:
    ids = ",".join(f'"{t["info"]["run_id"]}"' for t in trials)
    page.goto(f"{base}/#/compare-runs?runs=[{ids}]&experiments=[\"{experiment_id}\"]")
    page.get_by_text("Parallel Coordinates Plot").first.wait_for()
    _settle(page, 4)
    page.screenshot(path=str(out))
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", help="the store: a sqlite file (mlflow.db) or its sqlite:/// URI")
    p.add_argument("--out", default="docs", help="folder of the screenshots (default docs/)")
    p.add_argument("--experiment", default="tensormask")
    p.add_argument("--sweep", help="the sweep's name (default: the newest)")
    p.add_argument("--run", help="the training run's name (default: the newest)")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    uri = args.store if args.store.startswith("sqlite:") else f"sqlite:///{Path(args.store).resolve()}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(uri, Path(out / ".mlflow-server").resolve()).start()
    try:
        experiment_id = server.experiment(args.experiment)["experiment_id"]
        parent, trials, training = _pick_runs(server, experiment_id, args.sweep, args.run)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(180_000)  # a loaded 2-core machine draws slowly
            for name, step in (
                ("mlflow-runs.png", lambda f: runs_list(page, server.url, experiment_id, parent, f)),
                ("mlflow-charts.png", lambda f: run_charts(page, server.url, experiment_id, training, f)),
                ("mlflow-compare.png", lambda f: compare(page, server.url, experiment_id, trials, f)),
            ):
                try:
                    step(out / name)
                except Exception:
                    page.screenshot(path=str(out / f"failed-{name}"))
                    print(f"failed on {name}; the page is in {out / f'failed-{name}'}", file=sys.stderr)
                    raise
            browser.close()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
