"""The HTML report and the Dash explorer, checked in a real browser (Debian's Chromium driven by Playwright)."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import vitlens
from analyses.class_embedding import ClassRankReducer
from vitlens.data import load_dataset
from vitlens.explore import Server, create_app, image_stats
from vitlens.report import Study, render_sections, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTEFACTS = Path(__file__).parent / "artefacts"
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A study folder with one store of the bundled model: class ranks and attention patterns of 20 scenes."""
    model = vitlens.load_model("tiny-scenes")
    data = load_dataset("scenes", model=model, n_per_class=2)
    root = tmp_path_factory.mktemp("study")
    vitlens.record(model, data, root / "recording", hooks={"blocks.*.attn.hook_pattern": "all"},
                   reducers=[ClassRankReducer()], progress=False)
    return root, data


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    return page, errors


def test_missing_sections_name_their_command(study):
    root, data = study
    sections = {s["name"]: s for s in render_sections(Study(root, data=data))}
    assert sections["tokens"]["figures"] and sections["tokens"]["missing"] is None
    absent = [s for s in sections.values() if s["missing"]]
    for section in absent:  # every section this store cannot show says how to compute it
        assert "`vitlens " in section["missing"], section


def test_study_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        Study(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no vitlens store"):
        Study(tmp_path)


@needs_browser
def test_report_renders_in_a_browser_and_the_layer_slider_moves(study, browser):
    root, data = study
    report = write_report(root, data=data)
    page, errors = open_page(browser, report.as_uri())
    page.wait_for_selector(".js-plotly-plot .main-svg")
    for section in page.locator("section").all():
        if section.locator(".missing").count() == 0:
            assert section.locator(".js-plotly-plot .main-svg").count() > 0, section.get_attribute("id")

    first = "tokens-0"
    visible = "() => document.getElementById('%s').data.map(t => t.visible)" % first
    heatmap = "() => Array.from(document.getElementById('%s').querySelectorAll('.hm image')).map(i => " \
              "i.getAttribute('href')).join()" % first
    before_visible, before_image = page.evaluate(visible), page.evaluate(heatmap)
    rail = page.locator(f"#{first} .slider-rail-rect")
    box = rail.bounding_box()
    page.mouse.click(box["x"] + 2, box["y"] + box["height"] / 2)  # the first step: layer 0
    page.wait_for_timeout(300)
    after_visible, after_image = page.evaluate(visible), page.evaluate(heatmap)
    assert before_visible != after_visible and after_visible[:2] == [True, True]
    assert before_image != after_image

    # The attention viewer: a click on a patch token makes it the query; its row is what the store holds.
    viewer = "attention-0"
    z = "() => JSON.stringify(document.getElementById('%s').data.slice(-1)[0].z)" % viewer
    page.select_option(f"#{viewer}-layer", "2")
    page.select_option(f"#{viewer}-head", "1")
    cls_row = page.evaluate(z)
    page.locator(f"#{viewer}").scroll_into_view_if_needed()
    heat = page.locator(f"#{viewer} .hm").bounding_box()
    page.mouse.click(heat["x"] + heat["width"] * 4.5 / 6, heat["y"] + heat["height"] * 1.5 / 6)  # row 1, col 4
    page.wait_for_timeout(300)
    store = Study(root).stores["recording"]
    query = int(store.layout.tokens("patches")[1 * 6 + 4])
    expected = store["blocks.2.attn.hook_pattern"][0][1, query, store.layout.tokens("patches").numpy()]
    shown = np.array(json.loads(page.evaluate(z)), dtype=np.float32)
    assert page.evaluate(z) != cls_row
    assert np.allclose(shown.ravel(), expected, atol=1e-3)
    assert errors == []
    ARTEFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "report.png"), full_page=False)
    page.close()


@needs_browser
def test_explorer_picks_an_image_and_a_layer(study, browser):
    root, data = study
    app = create_app(root, data=data)
    with Server(app) as server:
        page, errors = open_page(browser, server.url)
        page.wait_for_selector("#ranks .hm image")

        def heatmap():
            return page.evaluate("() => JSON.stringify(document.getElementById('ranks').querySelector"
                                 "('.js-plotly-plot').data[0].z)")

        start = heatmap()
        page.locator("#layer [role=slider]").press("Home")  # layer 0
        page.wait_for_function("z => JSON.stringify(document.getElementById('ranks').querySelector"
                               "('.js-plotly-plot').data[0].z) !== z", arg=start)
        layer0 = heatmap()
        page.locator("#image").click()
        page.get_by_role("option", name=re.compile("^digit5")).first.click()
        page.wait_for_function("z => JSON.stringify(document.getElementById('ranks').querySelector"
                               "('.js-plotly-plot').data[0].z) !== z", arg=layer0)
        z = np.array(json.loads(heatmap()))  # the label's ranks of that image at layer 0, as the store has them
        store = Study(root).stores["recording"]
        index = int(np.flatnonzero(store.samples.sample_id.str.startswith("digit5/"))[0])
        patches = store.layout.tokens("patches").numpy()
        assert np.array_equal(z, store["class_rank"][index][0, patches].reshape(store.layout.grid))
        # A click on a point of the dataset scatter opens that image.
        before = heatmap()
        point = page.locator("#scatter .point").nth(3)
        point.scroll_into_view_if_needed()
        point.click(force=True)
        page.wait_for_function("z => JSON.stringify(document.getElementById('ranks').querySelector"
                               "('.js-plotly-plot').data[0].z) !== z", arg=before)
        opened = page.locator("#image").inner_text()
        assert opened.startswith(str(store.samples.sample_id[3]))
        assert errors == []
        page.close()
    with pytest.raises(Exception):  # the server is down once the context exits
        import urllib.request

        urllib.request.urlopen(server.url, timeout=2)


def test_image_stats_match_a_plain_count(study):
    root, data = study
    study_ = Study(root, data=data)
    stats = image_stats(study_)
    ranks = study_.stores["recording"]["class_rank"][:]
    assert np.allclose(stats["identifiability"], (ranks[:, -1] == 0).mean(axis=-1))
    assert np.allclose(stats["object_fraction"], [np.asarray(data[i]["token_mask"]).mean() for i in range(len(data))])


def test_cli_report_and_explore_refuse_a_path_that_is_not_a_store(tmp_path, capsys):
    from vitlens.cli import main

    assert main(["report", str(tmp_path)]) == 1
    assert "no vitlens store" in capsys.readouterr().err
    assert main(["explore", str(tmp_path / "missing")]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_cli_report_writes_the_file(study, tmp_path):
    from vitlens.cli import main

    root, _ = study
    out = tmp_path / "r.html"
    assert main(["report", str(root), "--data", "scenes", "--out", str(out)]) == 0
    text = out.read_text()
    assert 'id="tokens"' in text and "Plotly.newPlot" in text and '<script src="http' not in text


@needs_browser
def test_demo_report_renders_a_plot_in_every_section(demo, browser):
    report, _, _ = demo
    page, errors = open_page(browser, report.as_uri())
    page.wait_for_selector(".js-plotly-plot .main-svg")
    sections = page.locator("section").all()
    assert len(sections) >= 8
    for section in sections:
        name = section.get_attribute("id")
        assert section.locator(".missing").count() == 0, name
        assert section.locator(".js-plotly-plot .main-svg").count() > 0, name
    assert errors == []
    ARTEFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "demo_report.png"), full_page=True)
    page.close()



def test_scatter_relevance_mass_is_the_plain_share_inside_the_object(study, tmp_path):
    from analyses import explain
    from vitlens.explore import _relevance_mass, primary

    root, data = study
    copy = tmp_path / "study"
    shutil.copytree(root, copy)
    explain.run(vitlens.load_model("tiny-scenes"), data, ["rollout"], copy / "maps", progress=False)
    study_ = Study(copy, data=data)
    stats = image_stats(study_)
    mass = _relevance_mass(study_, "map.rollout", primary(study_).samples.sample_id, stats["masks"])
    maps = study_.stores["maps"]["map.rollout"][:]
    expected = [float((np.clip(m, 0, None) * (np.asarray(data[i]["token_mask"]) > 0.5)).sum() / np.clip(m, 0, None).sum())
                for i, m in enumerate(maps)]
    np.testing.assert_allclose(mass, expected, rtol=1e-6)
