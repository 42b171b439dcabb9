"""`vitlens demo` end to end on a fresh folder, at a small size (the `demo` fixture of conftest.py): every report
section has a figure, and a second run reuses every step."""
import re
import time

from analyses.demo import run_demo, summary
from vitlens import registry


def test_demo_fills_every_section_and_a_second_run_reuses_it(demo):
    report, steps, cold = demo
    assert (steps.status == "computed").all()
    html = report.read_text()
    sections = dict(re.findall(r'<section id="([^"]+)" class="section">(.*?)</section>', html, flags=re.S))
    assert set(sections) == {s.name for s in registry.sections()}
    for name, body in sections.items():
        assert 'class="missing"' not in body, (name, body[:300])
        assert "Plotly.newPlot" in body, name

    table = summary(report.parent)
    last_cls = table[table.metric.str.contains("cls tokens")].value.astype(float).item()
    assert 0 <= last_cls <= 100

    start = time.perf_counter()
    _, again = run_demo(report.parent, n_per_class=11, bench_per_class=2, diffmask_steps=6, progress=False)
    warm = time.perf_counter() - start
    assert list(again.status[:-1]) == ["reused"] * (len(again) - 1) and again.step.iloc[-1] == "report"
    assert warm < cold / 2
