"""The README's screenshots, from the shipped demo runs (data/runs/demo-*), in headless Chromium.

    python docs/screenshots.py                  # all tabs into docs/screenshots/
    python docs/screenshots.py tokens compare   # some of them

The app runs as a user starts it (``python app.py``) on a temporary copy of the demo runs, so the shipped
data and its index stay untouched. Chromium is Debian's (``--chromium``), as in the tests and benchmarks.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from ui_speed import ARGS, free_port, start_app  # noqa: E402

RUN, OTHER = "demo-sft-position", "demo-antiop-position"
# tab -> (query, what must be drawn before the picture is taken)
TABS = {
    "inspect": (f"?tab=inspect&run={RUN}&sample=2&token=40", "#tv-breakdown .js-plotly-plot .main-svg"),
    "concentration": (f"?tab=concentration&run={RUN}", "#tv-tab-concentration .js-plotly-plot .main-svg"),
    "layers": (f"?tab=layers&run={RUN}", "#tv-tab-layers .js-plotly-plot .main-svg"),
    "tokens": (f"?tab=tokens&run={RUN}", "#tv-surprising tr[data-pos]"),
    "training": (f"?tab=training&run={RUN}", "#tv-tab-training .js-plotly-plot .main-svg"),
    "influence": (f"?tab=influence&run={RUN}&step=60", "#tv-infl-quadrants .js-plotly-plot .main-svg"),
    "runvsrun": (f"?tab=runvsrun&run={RUN}&step=60&runs={OTHER}&metric=weight", "#tv-rvr-diff .t"),
    "compare": (f"?tab=compare&run={RUN}", "#tv-cmp-summary table"),
    "launch": ("?tab=launch", "#tv-f-steps input"),          # the form, made when the tab opens
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tabs", nargs="*", help=f"tabs to capture: {', '.join(TABS)} (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    ap.add_argument("--chromium", default=os.environ.get("TOKVIZ_CHROMIUM", "/usr/bin/chromium"))
    args = ap.parse_args(argv)
    unknown = [t for t in args.tabs if t not in TABS]
    if unknown:
        ap.error(f"unknown tab(s) {', '.join(unknown)}; available: {', '.join(TABS)}")
    from playwright.sync_api import sync_playwright

    home = Path(tempfile.mkdtemp(prefix="tokviz-shots-"))
    for run in sorted((ROOT / "data" / "runs").glob("demo-*")):
        shutil.copytree(run, home / "runs" / run.name)
    port = free_port()
    proc, _ = start_app(home, port)
    url = f"http://127.0.0.1:{port}/"
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for name in args.tabs or TABS:
                query, ready = TABS[name]
                page.goto(url + query)
                page.wait_for_selector(ready, timeout=60_000)
                page.wait_for_timeout(800)          # figures finish their transitions
                page.screenshot(path=str(args.out / f"{name}.png"), full_page=True)
                print(f"wrote {args.out / f'{name}.png'}")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
