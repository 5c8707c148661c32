"""Token->image attention-map figures (PNG) from the runs' `attention_maps.npz` (`carsam.diagnostics.maps`).

`attention_maps_<image id>_<prompt index>.png`, one per prompt: rows are the decoder's token->image
attentions (layer 0, 1, ..., then the final attention), columns FP and then each run's quantized model,
each cell the map of the single-mask output token (mean over heads) over the image-token grid, drawn
over the model-input frame with the prompt box; one colour scale per row (0 to the row's largest
value), so a flattened (dissipated) map reads as a dim, spread one; the cell title gives the map's
normalised entropy H (1 = uniform over the image tokens).

The FP column is the first run's FP map; a run whose FP map of that prompt differs from it (another model
or dataset) is left out of that figure. At most `MAX_RUN_COLUMNS` runs are drawn, the first in record
order (by run id, i.e. start time): to compare other runs, report a folder that holds just those.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from carsam.diagnostics.attention import normalized_entropy
from carsam.diagnostics.maps import AttentionMaps, load_run_maps
from carsam.files import replace_atomic

logger = logging.getLogger(__name__)

MAX_RUN_COLUMNS = 6
FP_MATCH_TOLERANCE = 1e-4  # largest |difference| of two runs' FP maps that still counts as the same model
DPI = 150


def load_attention_maps(runs_dir: str | Path, labels: Mapping[str, str]) -> dict[str, AttentionMaps]:
    """{label: maps} of the runs (`labels`: run_id -> label) that have a readable `attention_maps.npz`."""
    loaded = {label: load_run_maps(Path(runs_dir) / run_id) for run_id, label in labels.items()}
    return {label: maps for label, maps in loaded.items() if maps is not None}


def map_entropy(prob_map: np.ndarray) -> float:
    """Normalised Shannon entropy of a map `(g, g)` of probabilities (`normalized_entropy` over its g*g tokens)."""
    return float(normalized_entropy(torch.from_numpy(prob_map.reshape(1, -1)))[0])


def layer_label(layer: int, depth: int) -> str:
    """Row label of a token->image attention (layer == depth: the final attention)."""
    return "final t2i" if layer == depth else f"t2i layer {layer}"


def prompt_keys(maps: Mapping[str, AttentionMaps]) -> list[tuple[int, int]]:
    """(image id, prompt index) of every prompt in any run, in first-seen order."""
    keys: dict[tuple[int, int], None] = {}
    for m in maps.values():
        keys.update(dict.fromkeys(zip(m.image_ids.tolist(), m.prompt_index.tolist())))
    return list(keys)


def _index_of(m: AttentionMaps, key: tuple[int, int]) -> int | None:
    hits = np.flatnonzero((m.image_ids == key[0]) & (m.prompt_index == key[1]))
    return int(hits[0]) if len(hits) else None


def _columns(maps: Mapping[str, AttentionMaps], key: tuple[int, int]) -> list[tuple[str, AttentionMaps, int]]:
    """(label, maps, row of the prompt) of the runs drawn for `key`: those whose FP map matches the first's."""
    present = [(label, m, i) for label, m in maps.items() if (i := _index_of(m, key)) is not None]
    if not present:
        return []
    _, ref, ref_i = present[0]
    kept = []
    for label, m, i in present:
        same = (m.fp.shape[1:] == ref.fp.shape[1:]
                and float(np.abs(m.fp[i] - ref.fp[ref_i]).max()) <= FP_MATCH_TOLERANCE)
        if same:
            kept.append((label, m, i))
        else:
            logger.info("attention maps of %s left out of prompt %s: its FP map differs (another model or data)",
                        label, key)
    if len(kept) > MAX_RUN_COLUMNS:
        logger.info("attention maps of prompt %s: drawing the first %d of %d runs", key, MAX_RUN_COLUMNS, len(kept))
    return kept[:MAX_RUN_COLUMNS]


def _draw_cell(ax, frame: np.ndarray, box: np.ndarray, prob_map: np.ndarray, vmax: float, title: str) -> None:
    side = frame.shape[0]
    ax.imshow(frame.mean(axis=2), cmap="gray", vmin=0, vmax=255, extent=(0, side, side, 0))
    level = np.clip(prob_map / vmax, 0.0, 1.0)
    overlay = colormaps["inferno"](level)
    overlay[..., 3] = 0.1 + 0.85 * level  # weak attention lets the image show through
    ax.imshow(overlay, extent=(0, side, side, 0), interpolation="nearest")
    x0, y0, x1, y1 = box.tolist()
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", linewidth=1.0))
    ax.set_title(f"{title}\nH={map_entropy(prob_map):.3f}", fontsize="x-small")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_prompt_maps(maps: Mapping[str, AttentionMaps], key: tuple[int, int], path: str | Path) -> Path | None:
    """`attention_maps_<image>_<prompt>.png` of one prompt (module docstring); None if no run has it."""
    columns = _columns(maps, key)
    if not columns:
        return None
    _, ref, ref_i = columns[0]
    layers = ref.layers.tolist()
    depth = max(layers)
    cells = [("FP", ref.fp[ref_i])] + [(label, m.q[i]) for label, m, i in columns]
    fig = Figure(figsize=(1.9 * len(cells), 2.0 * len(layers)))
    axes = fig.subplots(len(layers), len(cells), squeeze=False)
    for row, layer in enumerate(layers):
        vmax = max(float(c[1][row].max()) for c in cells) or 1.0
        for col, (label, stack) in enumerate(cells):
            _draw_cell(axes[row][col], ref.images[ref_i], ref.boxes[ref_i], stack[row], vmax,
                       f"{label}" if row == 0 else "")
        axes[row][0].set_ylabel(layer_label(layer, depth), fontsize="small")
    fig.suptitle(f"token -> image attention of the mask token, image {key[0]} prompt {key[1]} (mean over heads)",
                 fontsize="small")
    fig.tight_layout()
    FigureCanvasAgg(fig)
    return replace_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))


def write_map_figures(maps: Mapping[str, AttentionMaps], out_dir: str | Path) -> list[Path]:
    """One `plot_prompt_maps` PNG per prompt found in any run's maps, under `out_dir`."""
    written = [plot_prompt_maps(maps, key, Path(out_dir) / f"attention_maps_{key[0]}_{key[1]}.png")
               for key in prompt_keys(maps)]
    return [p for p in written if p is not None]


__all__ = ["FP_MATCH_TOLERANCE", "MAX_RUN_COLUMNS", "layer_label", "load_attention_maps", "map_entropy",
           "plot_prompt_maps", "prompt_keys", "write_map_figures"]
