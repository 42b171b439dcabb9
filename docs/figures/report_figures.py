"""Regenerate the README's report figures: screenshots of `vitlens demo`'s report in headless Chromium.

    vitlens demo --out cache/demo && python docs/figures/report_figures.py cache/demo/report.html
"""
import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

FIGURES = {"identifiability-0": "identifiability.png", "tokens-0": "token_ranks.png", "benchmark-1": "benchmark.png"}


def main(report: str) -> None:
    out = Path(__file__).parent
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"),
                                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(Path(report).resolve().as_uri())
        page.wait_for_selector(".js-plotly-plot .main-svg")
        for div, name in FIGURES.items():
            page.locator(f"#{div}").screenshot(path=str(out / name))
            print(out / name)
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1])
