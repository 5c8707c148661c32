"""The page renders in a real headless browser (Debian's chromium): no JS errors, names in the DOM, a screenshot."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from carsam.report.dashboard import build_dashboard

CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium not found: `make test` installs it with "
                                 "tools/system-packages.sh (Debian package chromium; needs root and apt-get)")]

# Appended to a copy of the page: drives every control (selectors, sort headers, selection buttons), so the
# JS paths behind them run too; their errors land in <body data-js-errors> like the first render's.
EXERCISE = """<script>
(function () {
  function cycle(id) {
    var sel = document.getElementById(id);
    Array.prototype.slice.call(sel.options).forEach(function (o) {
      sel.value = o.value; sel.dispatchEvent(new Event("change", {bubbles: true})); });
  }
  ["attn-kind", "head-run", "head-kind", "recon-run", "recon-unit", "map-prompt"].forEach(cycle);
  var group = document.getElementById("group-seeds");
  group.click(); cycle("attn-kind"); group.click();
  Array.prototype.slice.call(document.querySelectorAll("#table th")).forEach(function (th) { th.click(); th.click(); });
  ["sel-none", "sel-diag", "sel-all"].forEach(function (id) {
    document.getElementById(id).click(); cycle("attn-kind"); cycle("recon-unit"); });
  document.querySelector("#runlist input").click();
  document.querySelector("#runlist input").click();
  document.body.setAttribute("data-exercised", "1");
})();
</script>
</body>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr",
           "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def _body_attrs(dom: str) -> dict[str, str]:
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))


def test_page_renders_without_js_errors_and_shows_the_runs(fake_runs, tmp_path):
    page = build_dashboard(fake_runs["dir"], tmp_path / "page.html")
    exercised = tmp_path / "exercised.html"
    exercised.write_text(page.read_text(encoding="utf-8").replace("</body>", EXERCISE, 1), encoding="utf-8")
    run = _chromium(tmp_path, "--dump-dom", exercised.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    attrs = _body_attrs(run.stdout)
    assert attrs.get("data-rendered") == "1" and attrs.get("data-exercised") == "1", attrs
    assert attrs.get("data-js-errors") == "0", [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    assert "Uncaught" not in run.stderr
    rendered = re.sub(r"<script\b.*?</script>", "", run.stdout, flags=re.DOTALL)  # drop the JSON blob and code
    for rec in fake_runs["records"].values():
        assert html.escape(rec.name, quote=False) in rendered, rec.name
    assert "<b>bold</b>" not in rendered  # a run name is text, never markup
    assert rendered.count("<svg") >= 3 and "decoder.token_to_image" in rendered and "oscillation_index/out" in rendered
    assert rendered.count("<canvas") == 3 * 3  # the maps: 3 layers x (FP + the two runs with maps)
    assert "final t2i" in rendered and "H=" in rendered


def test_screenshot_is_produced_and_not_blank(fake_runs, tmp_path):
    page = build_dashboard(fake_runs["dir"], tmp_path / "page.html")
    shot = tmp_path / "shot.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,1000", page.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 1000)
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, charts, swatches: far from a blank page
