"""`carsam dashboard`: one self-contained HTML page of the run records and their diagnostics.

Reads only `runs/<run_id>/record.json` (`carsam.record.list_records`) and, where present,
`runs/<run_id>/diagnostics.parquet` (`carsam.diagnostics.writer.read_diagnostics`); never W&B, never the
network. The page (`carsam/report/dashboard.html`: inline CSS, JS and hand-drawn SVG, no CDN) embeds
`dashboard_data(runs_dir)` as one JSON blob in `<script type="application/json" id="carsam-data">`,
with every `<` written `\\u003c` so no string can close the script. Non-finite numbers become null.

Data layout (`DATA_VERSION` 2):
- `runs`: one entry per readable record, oldest first: run_id, name, method, model (`model.type`), w_bits,
  a_bits, seed, prompts, status, metrics, timings, seconds (`timings.total`), has_diagnostics, setting (the
  report's cell of the run, seeds aside: `carsam.report.records.setting_labels`; the page's "mean over seeds"
  groups by it).
- `diagnostics[run_id]` (runs with a readable diagnostics file only):
  `attention`: rows `[module, layer, head, kind, value]` (kinds without a '/', e.g. `entropy_q`);
  `curves`: `{unit: {stream: {"step": [...], "value": [...]}}}` from the `loss/{stream}` rows;
  `unit_stats`: rows `[module, kind, step, value]` of every other `{quantity}/{stream}` kind
  (`oscillation_index/out`, `slope_sign_changes/out`, `interference/queries`, `boundary_error/keys`, ...).
- `maps[run_id]` (runs with a readable `attention_maps.npz`, `carsam.diagnostics.maps`): `layers`, `grid`,
  and `prompts`: `[{"image_id", "prompt_index", "box" (xyxy in the frame's pixels), "frame" (a key of
  `frames`), "side" (the frame's pixels), "fp", "q" ([layer][g*g] probabilities, row-major)}]`.
- `frames`: `{key: "data:image/png;base64,..."}`, each model-input frame once (key: a hash of its pixels).
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import http.server
import io
import json
import logging
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from carsam.diagnostics.maps import AttentionMaps, load_run_maps
from carsam.diagnostics.writer import DIAGNOSTICS_FILE, read_diagnostics
from carsam.files import write_text_atomic
from carsam.record import list_records
from carsam.report.records import setting_labels

logger = logging.getLogger(__name__)

DATA_VERSION = 2
DATA_ID = "carsam-data"
DASHBOARD_FILE = "dashboard.html"
RUN_KEYS = ("run_id", "name", "method", "w_bits", "a_bits", "seed", "prompts", "status", "status_note")
_PLACEHOLDER_RE = re.compile(r"__CARSAM_(DATA|SUMMARY)__")  # the template's slots
_DATA_RE = re.compile(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', re.DOTALL)


def _json_safe(obj: Any) -> Any:
    """`obj` with non-finite floats as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _run_entry(rec: dict[str, Any], has_diagnostics: bool, setting: str) -> dict[str, Any]:
    """The table fields of one record; `setting`: its `setting_labels` entry."""
    entry: dict[str, Any] = {key: rec.get(key) for key in RUN_KEYS}
    entry["model"] = str((rec.get("model") or {}).get("type", ""))
    entry["setting"] = setting
    entry["metrics"] = dict(rec.get("metrics") or {})
    entry["timings"] = dict(rec.get("timings") or {})
    entry["seconds"] = entry["timings"].get("total")
    entry["has_diagnostics"] = has_diagnostics
    return entry


def _diagnostics_entry(df: pd.DataFrame) -> dict[str, Any]:
    """One run's diagnostics table -> `{"attention", "curves", "unit_stats"}` (module docstring)."""
    if df.empty:  # e.g. an FP run: nothing quantized, nothing reconstructed
        return {"attention": [], "curves": {}, "unit_stats": []}
    df = df.sort_values(["module", "kind", "layer", "head", "step"], kind="stable")
    recon = df["kind"].str.contains("/", regex=False)
    attention = df.loc[~recon, ["module", "layer", "head", "kind", "value"]]
    quantity = df["kind"].str.partition("/")[0]
    curves: dict[str, dict[str, dict[str, list]]] = {}
    for (module, kind), rows in df[recon & (quantity == "loss")].groupby(["module", "kind"], sort=True):
        curves.setdefault(str(module), {})[str(kind).partition("/")[2]] = {
            "step": rows["step"].tolist(), "value": rows["value"].tolist()}
    stats = df.loc[recon & (quantity != "loss"), ["module", "kind", "step", "value"]]
    return {"attention": attention.values.tolist(), "curves": curves, "unit_stats": stats.values.tolist()}


def _read_run_diagnostics(run_dir: Path) -> dict[str, Any] | None:
    """The diagnostics entry of one run folder; None without a (readable) diagnostics file."""
    if not (run_dir / DIAGNOSTICS_FILE).is_file():
        return None
    try:
        return _diagnostics_entry(read_diagnostics(run_dir))
    except (OSError, ValueError, KeyError) as err:  # pyarrow's ArrowInvalid is a ValueError
        logger.warning("skipping unreadable diagnostics %s (%s)", run_dir / DIAGNOSTICS_FILE, err)
        return None


def _add_frame(frame: np.ndarray, frames: dict[str, str]) -> str:
    """Key of one `(F, F, 3)` uint8 frame (a hash of its pixels) in `frames`, its PNG data URI added once."""
    key = hashlib.sha1(frame.tobytes()).hexdigest()[:16]
    if key not in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        frames[key] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return key


def _maps_entry(maps: AttentionMaps, frames: dict[str, str]) -> dict[str, Any]:
    """One run's maps (module docstring), adding its frames to `frames`."""
    prompts = []
    for i in range(len(maps.fp)):
        key = _add_frame(maps.images[i], frames)
        prompts.append({"image_id": int(maps.image_ids[i]), "prompt_index": int(maps.prompt_index[i]),
                        "box": [round(float(v), 2) for v in maps.boxes[i]], "frame": key,
                        "side": int(maps.images[i].shape[0]),
                        "fp": np.round(maps.fp[i].reshape(len(maps.layers), -1), 6).tolist(),
                        "q": np.round(maps.q[i].reshape(len(maps.layers), -1), 6).tolist()})
    return {"layers": maps.layers.tolist(), "grid": maps.grid, "prompts": prompts}


def dashboard_data(runs_dir: str | Path) -> dict[str, Any]:
    """Everything the page shows, from the records (and diagnostics files) under `runs_dir`.

    Returns `{"version", "runs_dir", "generated_at", "runs": [...], "diagnostics": {run_id: {...}}}`
    (layout in the module docstring), strict-JSON safe. Records that are not JSON objects are skipped
    with a warning, as `list_records` skips unreadable ones.
    """
    root = Path(runs_dir)
    runs: list[dict[str, Any]] = []
    diagnostics: dict[str, Any] = {}
    maps: dict[str, Any] = {}
    frames: dict[str, str] = {}
    readable = list_records(root)  # JSON objects only
    records = [rec for rec in readable if rec.get("run_id")]
    if len(records) < len(readable):
        logger.warning("skipping %d run record(s) without a run_id under %s", len(readable) - len(records), root)
    settings = setting_labels(records)
    for rec in records:
        run_id = str(rec["run_id"])
        diag = _read_run_diagnostics(root / run_id)
        if diag is not None:
            diagnostics[run_id] = diag
        run_maps = load_run_maps(root / run_id)
        if run_maps is not None:
            maps[run_id] = _maps_entry(run_maps, frames)
        runs.append(_run_entry(rec, diag is not None, settings[run_id]))
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return _json_safe({"version": DATA_VERSION, "runs_dir": str(root), "generated_at": stamp, "runs": runs,
                       "diagnostics": diagnostics, "maps": maps, "frames": frames})


def _summary(data: dict[str, Any]) -> str:
    """The page's one-line static summary (readable before, and without, the page's JS)."""
    n_runs, n_diag = len(data["runs"]), len(data["diagnostics"])
    if not n_runs:
        return f"no runs under {data['runs_dir']}"
    return (f"{n_runs} run{'s' if n_runs != 1 else ''} under {data['runs_dir']} ({n_diag} with diagnostics), "
            f"generated {data['generated_at']}")


def render_html(data: dict[str, Any]) -> str:
    """The page for `data` (as `dashboard_data` returns it)."""
    template = resources.files("carsam.report").joinpath("dashboard.html").read_text(encoding="utf-8")
    blob = json.dumps(data, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")
    slots = {"DATA": blob, "SUMMARY": html.escape(_summary(data))}
    return _PLACEHOLDER_RE.sub(lambda m: slots[m.group(1)], template)  # one pass: values are not rescanned


def dashboard_html(runs_dir: str | Path) -> str:
    """The page of the runs under `runs_dir`."""
    return render_html(dashboard_data(runs_dir))


def build_dashboard(runs_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the page atomically to `out` (default `runs_dir/dashboard.html`); returns its path."""
    return write_text_atomic(Path(out) if out else Path(runs_dir) / DASHBOARD_FILE, dashboard_html(runs_dir))


def extract_embedded_data(page: str) -> dict[str, Any]:
    """The JSON blob embedded in a dashboard page. Raises ValueError if the page has none."""
    match = _DATA_RE.search(page)
    if match is None:
        raise ValueError(f"no <script id={DATA_ID!r}> data element in the page")
    return json.loads(match.group(1))


def make_server(runs_dir: str | Path, host: str = "127.0.0.1", port: int = 8765) -> http.server.HTTPServer:
    """An HTTP server (not yet serving) whose `/` is the page, rebuilt from `runs_dir` on each request.

    Port 0 picks a free port (`server.server_address`). Call `serve_forever()`; `shutdown()` from another
    thread or Ctrl-C stops it.
    """
    root = Path(runs_dir)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?", 1)[0] not in ("/", "/index.html", f"/{DASHBOARD_FILE}"):
                self.send_error(404, "the dashboard is at /")
                return
            body = dashboard_html(root).encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
            logger.debug("%s %s", self.address_string(), format % args)

    return http.server.ThreadingHTTPServer((host, port), Handler)


__all__ = ["build_dashboard", "dashboard_data", "dashboard_html", "extract_embedded_data", "make_server",
           "render_html"]
