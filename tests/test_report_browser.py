"""The HTML report renders in a real headless browser with every plot present (Debian's chromium)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=5000",
]  # fmt: skip

CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.title = 'images ' + ok + '/' + imgs.length + ' tables ' + document.querySelectorAll('table').length;
});
</script>"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("Debian's chromium is required for this test: `make browser` (apt-get install chromium) installs it")
    return exe


@pytest.fixture(scope="module")
def report_dir(cnn_checkpoint, tmp_path_factory):
    from edgecompress.compress.pipeline import run_recipe
    from edgecompress.compress.recipe import parse_recipe

    out = tmp_path_factory.mktemp("run")
    recipe = parse_recipe({
        "version": 1, "model": {"checkpoint": str(cnn_checkpoint)}, "data": "mnist", "targets": ["x86-64"],
        "stages": [{"sparsify": {"pattern": "2:4", "method": "mdgf", "max_steps": 40, "eval_every": 20,
                                 "batch_size": 32}}],
        "profile": {"min_runs": 30, "min_seconds": 0.2},
        "gates": {"x86-64": {"max_accuracy_drop": 50.0}},
    }, "test")  # fmt: skip
    run_recipe(recipe, out)
    return out


def test_report_renders_with_every_plot(report_dir, tmp_path):
    html = (report_dir / "report.html").read_text()
    n_imgs = html.count("<img ")
    # trade-off plot, latency distribution, the sparsify stage's training curves
    assert n_imgs >= 3
    assert "Artifact lineage" in html and "export-onnx" in html
    page = tmp_path / "page.html"
    page.write_text(html.replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = subprocess.run([_chromium(), *CHROMIUM_FLAGS, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout  # fmt: skip
    title = re.search(r"<title>(.*?)</title>", dom)
    assert title is not None, dom[:500]
    assert title.group(1) == f"images {n_imgs}/{n_imgs} tables {html.count('<table')}", title.group(1)
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--screenshot={shot}", "--window-size=1100,1600", page.as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_markdown_report_matches_summary(report_dir):
    summary = json.loads((report_dir / "summary.json").read_text())
    md = (report_dir / "report.md").read_text()
    acc = summary["results"][0]["metrics"]["accuracy"]
    assert f"{acc:.2f}" in md and "sparsify" in md
    assert Path(summary["results"][0]["artifact"]).is_dir()
