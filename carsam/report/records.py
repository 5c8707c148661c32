"""Run records -> one long table: one row per run and metric, the run's settings as columns.

Reads only `runs/*/record.json` (never W&B). Setting columns, from the record's resolved `config`
(a key an older record lacks takes the default of the code that wrote it: MAC and JCAR off, the
encoder quantized):

- `encoder`: "FP" for the `fp` method, for a W32A32 run and when `quant.quantize_encoder` is false;
  else "quantized".
- `data_seed`: `config.data.synthetic_seed` (the testbed dataset), next to the run's `seed`.
- `mac`: "off", or `"<variant>@<strength>"` followed by ` damping=..`, ` targets=..`, ` order=..`, ` solver=..` for
  each field that differs from `MacConfig`'s default (e.g. `qk@1`, `both@0.5 damping=1`).
- `jcar`: "off", or the grouping followed by ` w=<w_tokens>:<w_image>` when not 1:1 and ` +var` with
  variance weighting (e.g. `pair`, `pair w=10:1`, `pair +var`).
- `other`: what tells apart completed runs that agree in all the columns above but seeds (method,
  bits, prompts, encoder, mac, jcar): each setting whose value varies among them, where the run's value
  differs from the most common one among the completed runs of its method (ties: the newest run's),
  as `key=value, ...`; "-" when none. So runs are never averaged over different settings, and a
  setting that no other run of the same cell changed (e.g. a recon knob of a method without
  reconstruction, whose default moved between versions) is not shown. Not settings: names, seeds,
  paths, the device, MAC/JCAR (own columns), tracking, diagnostics, and the recon knobs that only
  choose what is recorded (`RECORDING_KEYS`).
- `mac_variant` ... `jcar_variance`: MAC's and JCAR's fields one by one, "-" when off, for the
  readings tables.

For `other`, a setting an older record lacks is the value its code ran with: today's default, except
where the field arrived with a different default than the behaviour before it (`LEGACY_VALUES`: the
encoder's rel-pos term read the FP query and the encoder had no AGQ before issue 13).

Metrics: every `record["metrics"]` entry (`eval/mAP`, `diag/*`, ...) plus `time/total_s`
(`timings.total`).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from carsam.config import SAM2_TYPES, JcarConfig, MacConfig, RunConfig, to_dict
from carsam.record import list_records

COMPLETED = "completed"
NONE = "-"  # an empty setting cell (no other difference, a MAC field of a run without MAC)
TIME_METRIC = "time/total_s"
ID_COLUMNS = ("run_id", "name", "method", "w_bits", "a_bits", "seed", "data_seed", "prompts", "encoder", "mac",
              "jcar", "other", "status")
MAC_LABEL_EXTRAS = ("damping", "targets", "order", "solver")  # shown in the `mac` column when not the default
READING_COLUMNS = ("mac_variant", "mac_strength", "mac_damping", "mac_targets", "mac_order", "mac_solver",
                   "jcar_grouping", "jcar_weights", "jcar_variance")
LONG_COLUMNS = (*ID_COLUMNS, *READING_COLUMNS, "metric", "value")
MAC_DEFAULTS: dict[str, Any] = dataclasses.asdict(MacConfig())  # CAR-SAM's main setting is the defaults
JCAR_DEFAULTS: dict[str, Any] = dataclasses.asdict(JcarConfig())
NOT_SETTINGS = ("name", "method", "seed", "runs_dir", "device", "data.synthetic_seed", "data.synthetic_root",
                "data.prompt_source", "quant.w_bits", "quant.a_bits", "quant.quantize_encoder")
NOT_SETTING_PREFIXES = ("mac.", "jcar.", "tracking.", "diagnostics.")
RECORDING_KEYS = ("recon.curve_points", "recon.track_interference", "recon.interference_images")


def _num(value: Any) -> str:
    """A number as the tables show it: `1.0` -> `1`, `0.010` -> `0.01`."""
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _section(config: Mapping[str, Any], name: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`config[name]` over `defaults` (records written before the section existed have none)."""
    return {**defaults, **(config.get(name) or {})}


def mac_label(config: Mapping[str, Any]) -> str:
    """The `mac` column of a resolved config (see the module docstring)."""
    mac = _section(config, "mac", MAC_DEFAULTS)
    if not mac["enabled"]:
        return "off"
    extra = [f" {k}={_num(mac[k])}" for k in MAC_LABEL_EXTRAS if mac[k] != MAC_DEFAULTS[k]]
    return f"{mac['variant']}@{_num(mac['strength'])}" + "".join(extra)


def jcar_label(config: Mapping[str, Any]) -> str:
    """The `jcar` column of a resolved config (see the module docstring)."""
    jcar = _section(config, "jcar", JCAR_DEFAULTS)
    if not jcar["enabled"]:
        return "off"
    weights = (jcar["w_tokens"], jcar["w_image"]) != (JCAR_DEFAULTS["w_tokens"], JCAR_DEFAULTS["w_image"])
    return (jcar["grouping"] + (f" w={_num(jcar['w_tokens'])}:{_num(jcar['w_image'])}" if weights else "")
            + (" +var" if jcar["variance_weighting"] else ""))


def readings(config: Mapping[str, Any]) -> dict[str, str]:
    """The `READING_COLUMNS` of a resolved config: MAC's and JCAR's fields, `NONE` when disabled."""
    mac, jcar = _section(config, "mac", MAC_DEFAULTS), _section(config, "jcar", JCAR_DEFAULTS)
    out = {f"mac_{k}": _num(mac[k]) if mac["enabled"] else NONE
           for k in ("variant", "strength", *MAC_LABEL_EXTRAS)}
    on = jcar["enabled"]
    out.update(mac_variant=mac["variant"] if mac["enabled"] else "off",
               jcar_grouping=jcar["grouping"] if on else "off",
               jcar_weights=f"{_num(jcar['w_tokens'])}:{_num(jcar['w_image'])}" if on else NONE,
               jcar_variance=("yes" if jcar["variance_weighting"] else "no") if on else NONE)
    return out


def encoder_label(record: Mapping[str, Any]) -> str:
    """"FP" or "quantized": the image encoder as the run evaluated it."""
    quant = (record.get("config") or {}).get("quant") or {}
    full_precision = record.get("method") == "fp" or min(record.get("w_bits", 32), record.get("a_bits", 32)) >= 32
    return "FP" if full_precision or not quant.get("quantize_encoder", True) else "quantized"


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"a.b": "1"}`; lists as compact JSON."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else _num(value)
    return flat


DEFAULT_SETTINGS = flatten(to_dict(RunConfig()))
# what a record written before these fields existed ran with (their defaults changed when they arrived)
LEGACY_VALUES = {"quant.rel_pos_query": "fp", "recon.agq_encoder": "False"}
FALLBACK_KEY = "model.sam2_stability_fallback"


def settings_of(record: Mapping[str, Any]) -> dict[str, str]:
    """The record's flattened resolved config, with the keys it lacks filled in (module docstring). SAM2's
    stability fallback reads as unset for a SAM v1 model, which has none (records before its default became
    null wrote `true`)."""
    flat = flatten(record.get("config") or {})
    missing = {k: LEGACY_VALUES.get(k, v) for k, v in DEFAULT_SETTINGS.items() if k not in flat}
    settings = {**flat, **missing}
    if settings["model.type"] not in SAM2_TYPES:
        settings[FALLBACK_KEY] = DEFAULT_SETTINGS[FALLBACK_KEY]
    return settings


def _is_setting(key: str) -> bool:
    return key not in NOT_SETTINGS and key not in RECORDING_KEYS and not key.startswith(NOT_SETTING_PREFIXES)


def _most_common(values: Sequence[str]) -> str:
    """The most frequent value; among equally frequent ones, the one that occurs last (newest run)."""
    counts = Counter(values)
    top = max(counts.values())
    return next(v for v in reversed(values) if counts[v] == top)


def reference_settings(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """Per method, each setting's most common value among its completed runs (`other`'s reference)."""
    by_method: dict[str, dict[str, list[str]]] = {}
    for rec in records:
        if rec.get("status") != COMPLETED:
            continue
        values = by_method.setdefault(rec.get("method", ""), {})
        for key, value in settings_of(rec).items():
            if _is_setting(key):
                values.setdefault(key, []).append(value)
    return {m: {k: _most_common(v) for k, v in vals.items()} for m, vals in by_method.items()}


def _cell(record: Mapping[str, Any]) -> tuple:
    """What a run's table cell is made of, seeds and `other` aside."""
    config = record.get("config") or {}
    return (record.get("method"), record.get("w_bits"), record.get("a_bits"), record.get("prompts"),
            encoder_label(record), mac_label(config), jcar_label(config))


def varying_settings(records: Sequence[Mapping[str, Any]]) -> dict[tuple, set[str]]:
    """Per cell (`_cell`), the settings with more than one value among its completed runs."""
    values: dict[tuple, dict[str, set[str]]] = {}
    for rec in records:
        if rec.get("status") == COMPLETED:
            cell = values.setdefault(_cell(rec), {})
            for key, value in settings_of(rec).items():
                cell.setdefault(key, set()).add(value)
    return {c: {k for k, v in keys.items() if len(v) > 1 and _is_setting(k)} for c, keys in values.items()}


def other_label(record: Mapping[str, Any], reference: Mapping[str, str], keys: set[str]) -> str:
    """`key=value, ...` for the settings among `keys` where `record` differs from `reference`, else `NONE`."""
    flat = settings_of(record)
    diffs = [f"{k}={v}" for k, v in sorted(flat.items()) if k in keys and k in reference and v != reference[k]]
    return ", ".join(diffs) or NONE


def run_row(record: Mapping[str, Any], other: str) -> dict[str, Any]:
    """The `ID_COLUMNS` and `READING_COLUMNS` of one record, given its `other` label."""
    config = record.get("config") or {}
    return {"run_id": record.get("run_id", ""), "name": record.get("name", ""), "method": record.get("method", ""),
            "w_bits": int(record.get("w_bits", 32)), "a_bits": int(record.get("a_bits", 32)),
            "seed": int(record.get("seed", 0)),
            "data_seed": int((config.get("data") or {}).get("synthetic_seed", 0)),
            "prompts": record.get("prompts", ""), "encoder": encoder_label(record), "mac": mac_label(config),
            "jcar": jcar_label(config), "other": other, "status": record.get("status", ""), **readings(config)}


def run_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`run_row` of each record, its `other` label computed against all of `records`."""
    references, varying = reference_settings(records), varying_settings(records)
    return [run_row(rec, other_label(rec, references.get(rec.get("method", ""), {}), varying.get(_cell(rec), set())))
            for rec in records]


def metric_values(record: Mapping[str, Any]) -> dict[str, float]:
    """Every metric of a record, plus `time/total_s` when the record has a total time."""
    values = {k: float("nan") if v is None else float(v) for k, v in (record.get("metrics") or {}).items()}
    total = (record.get("timings") or {}).get("total")
    if total is not None:
        values[TIME_METRIC] = float(total)
    return values


def records_long(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per record and metric, columns `LONG_COLUMNS` (records without a metric have no row)."""
    rows = []
    for rec, ids in zip(records, run_rows(records)):
        rows += [{**ids, "metric": metric, "value": value} for metric, value in metric_values(rec).items()]
    return pd.DataFrame(rows, columns=list(LONG_COLUMNS)).astype({"w_bits": "int64", "a_bits": "int64",
                                                                  "seed": "int64", "data_seed": "int64",
                                                                  "value": "float64"})


def setting_labels(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """run_id -> what its table cell is, seeds aside: method, bits, prompts, encoder, MAC, JCAR, `other` and
    the dataset seed, as one readable string (runs that differ only in their seed share it)."""
    labels = {}
    for row in run_rows(records):
        parts = [f"{row['method']} W{row['w_bits']}A{row['a_bits']}", str(row["prompts"]), f"encoder {row['encoder']}",
                 f"mac {row['mac']}", f"jcar {row['jcar']}", f"data seed {row['data_seed']}"]
        labels[str(row["run_id"])] = " · ".join(parts + ([row["other"]] if row["other"] != NONE else []))
    return labels


def long_table(runs_dir: str | Path) -> pd.DataFrame:
    """All run records under `runs_dir` as one long table (every status; see `records_long`)."""
    return records_long(list_records(runs_dir))


def incomplete_runs(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The records whose status is not `completed` (failed, or still running / interrupted): run_id, name,
    method, status, error."""
    rows = [{"run_id": r.get("run_id", ""), "name": r.get("name", ""), "method": r.get("method", ""),
             "status": r.get("status", ""), "error": r.get("error", "") or r.get("status_note", "")}
            for r in records if r.get("status") != COMPLETED]
    return pd.DataFrame(rows, columns=["run_id", "name", "method", "status", "error"])
