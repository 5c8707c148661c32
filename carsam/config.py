"""Run configuration: frozen dataclasses, YAML experiments and `key=value` overrides.

Resolution order: the dataclass defaults <- an experiment YAML (listing only what it changes)
<- command-line overrides (`quant.w_bits=6 data.max_val_images=50`). Unknown keys raise, and so
do values whose type differs from the field's (an int is accepted where a float is expected).
Values of overrides are parsed as YAML scalars (`true`, `4`, `0.5`, `[4, 8]`).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import yaml

from carsam.data.coco import PROMPT_SOURCES
from carsam.data.synthetic import FAMILIES as SYNTHETIC_FAMILIES
from carsam.diagnostics.collector import SCOPES as COLLECTOR_SCOPES
from carsam.methods.mac import ORDERS as MAC_ORDERS
from carsam.methods.mac import SOLVERS as MAC_SOLVERS
from carsam.methods.mac import STEPS as MAC_STEPS
from carsam.methods.mac import TARGETS as MAC_TARGETS
from carsam.methods.registry import get_method, method_names
from carsam.models.quantize import QuantConfig
from carsam.models.sam import REAL_MODEL_TYPES
from carsam.models.sam2_image import SAM2_MODEL_TYPES, SAM2_STABILITY_FALLBACK
from carsam.recon.block_io import INPUT_SOURCES
from carsam.recon.units import DECODER_GROUPINGS, ENCODER_GROUPINGS, JOINT_GROUPINGS
from carsam.testbed.sam2_spec import SAM2_TESTBED_STABILITY_FALLBACK, SAM2_TESTBED_TYPE
from carsam.testbed.shipped import SHIPPED_TESTBEDS
from carsam.tracking import MODES as TRACKER_MODES

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

MODEL_TYPES = (*SHIPPED_TESTBEDS, *REAL_MODEL_TYPES)
SAM2_TYPES = (*SAM2_MODEL_TYPES, SAM2_TESTBED_TYPE)  # the model types `model.sam2_stability_fallback` applies to
DEVICE_PATTERN = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A configuration is invalid; the message names the key and what to change."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which SAM to quantize. `checkpoint` empty with `type: testbed` (or `testbed_v2`) means that testbed's
    shipped checkpoint. `sam2_stability_fallback` (SAM2 only): SAM2's image-predictor fallback from an unstable
    single mask to the best multimask output; null (the default) resolves to the model's own: on for the real
    SAM2 checkpoints (as `build_sam2` sets it), off for `sam2_testbed` (its multimask tokens are untrained;
    carsam.testbed.sam2_spec). The resolved value is what a run records; it stays null for SAM v1."""

    type: str = "testbed"
    checkpoint: str = ""
    sam2_stability_fallback: bool | None = None

    def __post_init__(self) -> None:
        if self.type not in MODEL_TYPES:
            raise ConfigError(f"model.type must be one of {MODEL_TYPES}, got '{self.type}'")
        if self.type not in SHIPPED_TESTBEDS and not self.checkpoint:
            raise ConfigError(f"model.checkpoint is required for model.type={self.type} (path to the SAM .pth)")
        if self.type in SAM2_TYPES and self.sam2_stability_fallback is None:
            default = SAM2_TESTBED_STABILITY_FALLBACK if self.type == SAM2_TESTBED_TYPE else SAM2_STABILITY_FALLBACK
            object.__setattr__(self, "sam2_stability_fallback", default)
        elif self.type not in SAM2_TYPES and self.sam2_stability_fallback is False:  # true: ignored (old v1 records)
            raise ConfigError(f"model.sam2_stability_fallback applies to SAM2 only ({SAM2_TYPES}); "
                              f"remove it for model.type={self.type}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Evaluation and calibration data.

    Testbed (`images` empty): the synthetic dataset of family `synthetic_family` and seed `synthetic_seed`,
    generated under `synthetic_root` on first use. Real path: `images`, `annotations`, `prompts` (detector boxes in
    COCO results format) for evaluation and `calib_images`, `calib_annotations` for calibration
    (prompted by their GT boxes unless `calib_prompts` is given).
    """

    synthetic_seed: int = 0
    synthetic_family: str = "shapes"
    synthetic_root: str = "data"
    images: str = ""
    annotations: str = ""
    prompts: str = ""
    calib_images: str = ""
    calib_annotations: str = ""
    calib_prompts: str = ""
    prompt_source: str = "detector"
    calib_size: int = 32
    max_val_images: int = 0

    def __post_init__(self) -> None:
        if self.prompt_source not in PROMPT_SOURCES:
            raise ConfigError(f"data.prompt_source must be one of {PROMPT_SOURCES}, got '{self.prompt_source}'")
        if self.synthetic_family not in SYNTHETIC_FAMILIES:
            raise ConfigError(f"data.synthetic_family must be one of {sorted(SYNTHETIC_FAMILIES)}, "
                              f"got '{self.synthetic_family}'")
        if self.calib_size < 1:
            raise ConfigError(f"data.calib_size must be >= 1, got {self.calib_size}")
        if self.max_val_images < 0:
            raise ConfigError(f"data.max_val_images must be >= 0 (0 = all), got {self.max_val_images}")
        if self.images:
            self._check_real_paths()

    def _check_real_paths(self) -> None:
        if not self.annotations:
            raise ConfigError("the real-data path needs data.images and data.annotations (and data.prompts for "
                              "detector prompts; data.calib_images and data.calib_annotations for a method that "
                              "calibrates)")
        if self.prompt_source == "detector" and not self.prompts:
            raise ConfigError("data.prompt_source=detector needs data.prompts (a COCO detection-results JSON); "
                              "or set data.prompt_source=gt_boxes")

    def check_calibration_paths(self) -> None:
        """The real-data path of a method that calibrates also needs its calibration files (others never read
        them)."""
        if self.is_synthetic:
            return
        if not (self.calib_images and self.calib_annotations):
            raise ConfigError("a method that calibrates needs data.calib_images and data.calib_annotations on the "
                              "real-data path (e.g. 32 train2017 images); fp and box_as_mask need neither")
        if Path(self.calib_annotations).resolve() == Path(self.annotations).resolve():
            raise ConfigError("data.calib_annotations is the evaluation annotations file: calibrate on other "
                              "images (the protocol uses 32 train2017 images)")

    @property
    def is_synthetic(self) -> bool:
        return not self.images


RECON_GROUPINGS = DECODER_GROUPINGS
RECON_ENCODER_GROUPINGS = (*ENCODER_GROUPINGS, "none")  # none: encoder weights keep their RTN rounding
RECON_INPUTS = INPUT_SOURCES
RECON_CACHE_DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ReconConfig:
    """Block reconstruction of the `brecq`, `qdrop` and `ptq4sam` methods (carsam.recon.driver).

    `grouping` picks the decoder units (`attention_mlp`: PTQ4SAM's, or `block`); `encoder_grouping` the
    image-encoder units when the encoder is quantized (`encoder_block`, or `none`: encoder weights keep their RTN
    rounding). `iters` per unit defaults to 500 so the testbed rows run in minutes on a CPU; the paper protocol is
    `recon.iters=20000 recon.alpha_lr=0.001` (`experiments/*_paper.yaml`). `alpha_lr` defaults to 1e-2, not the
    paper's 1e-3: Adam moves each AdaRound `alpha` by at most about `lr` per step, so with 500 steps at 1e-3 a
    rounding can only flip where the residual is near 1/2 (the measurement behind this choice: docs/results.md,
    `bench/unit_lr_probe.py`). `quant_prob` is QDrop's keep probability during a unit's reconstruction (reset to 1
    everywhere afterwards); `inputs` is where the unit inputs come from (`quantized`: the partly reconstructed
    quantized model, as BRECQ/QDrop do). `agq_encoder`: also give the image-encoder attentions AGQ's log quantizer
    (ptq4sam and carsam; on by default, as PTQ4SAM's code; off: the decoder's only). `track_interference`: after
    each decoder unit, record the quantized model's queries/keys error at every decoder step on
    `interference_images` calibration images (the oscillation diagnostic). Memory: `max_boxes_per_step` caps the
    boxes of one block-I/O sample, so one reconstruction step (and one decoder pass while capturing) holds at most
    that many boxes whatever a detector gives per image (an image's boxes are split into chunks; 64 leaves every
    testbed image whole); `cache_dtype` is the CPU storage of the block I/O (`float16` halves it; samples are
    cast back to float32 on the device).
    """

    grouping: str = "attention_mlp"
    encoder_grouping: str = "encoder_block"
    iters: int = 500
    quant_prob: float = 0.5
    alpha_lr: float = 1e-2
    scale_lr: float = 4e-5
    round_weight: float = 0.01
    warmup: float = 0.2
    inputs: str = "quantized"
    seed: int = 0
    agq_encoder: bool = True
    curve_points: int = 50
    track_interference: bool = True
    interference_images: int = 4
    max_boxes_per_step: int = 64
    cache_dtype: str = "float32"

    def __post_init__(self) -> None:
        for key, value, valid in (("grouping", self.grouping, RECON_GROUPINGS),
                                  ("encoder_grouping", self.encoder_grouping, RECON_ENCODER_GROUPINGS),
                                  ("inputs", self.inputs, RECON_INPUTS),
                                  ("cache_dtype", self.cache_dtype, RECON_CACHE_DTYPES)):
            if value not in valid:
                raise ConfigError(f"recon.{key} must be one of {valid}, got '{value}'")
        if self.interference_images < 1:
            raise ConfigError(f"recon.interference_images must be >= 1, got {self.interference_images}")
        if self.max_boxes_per_step < 1:
            raise ConfigError(f"recon.max_boxes_per_step must be >= 1, got {self.max_boxes_per_step}")
        if self.iters < 1 or self.curve_points < 2:
            raise ConfigError(f"recon.iters must be >= 1 and recon.curve_points >= 2, got {self.iters}, "
                              f"{self.curve_points}")
        if not 0.0 < self.quant_prob <= 1.0:
            raise ConfigError(f"recon.quant_prob must be in (0, 1], got {self.quant_prob}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"recon.warmup must be in [0, 1), got {self.warmup}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"recon.seed must be in [0, 2**32), got {self.seed}")


MAC_VARIANTS = tuple(MAC_STEPS)


@dataclasses.dataclass(frozen=True)
class MacConfig:
    """MatMul-Aware Compensation (carsam.methods.mac): closed-form corrections of q/k/v_proj.

    `variant`: `qk` (q_proj then k_proj so that the scores with quantized operands match the FP
    scores), `pv` (v_proj so that P_hat V' matches P V), or `both`. `strength` alpha in [0, 1]:
    W <- W + alpha * dW. `damping`: ridge lambda relative to the mean diagonal of the normal matrix
    (GPTQ's 1%). `targets`: which attentions. `order`: before or after reconstruction. `solver` (q/k steps):
    `target_queries` (per sample the target operands that reproduce the FP scores, then one ridge fit of
    the projection) or `sylvester` (the paper's form: the separable normal equations solved as
    `AX + XB = C` by Bartels-Stewart; exact when all samples share a key Gram; see `carsam.methods.mac_math`).

    The defaults are carsam's CAR-SAM reading (MAC-QK at full strength on the token->image attentions,
    before reconstruction), chosen on the decoder-only W4A4 testbed ablation (docs/results.md); the
    `carsam` experiment files rely on them and `make sweep` searches around them.
    """

    enabled: bool = False
    variant: str = "qk"
    strength: float = 1.0
    damping: float = 0.01
    targets: str = "token_to_image"
    order: str = "before"
    solver: str = "target_queries"

    def __post_init__(self) -> None:
        for key, value, valid in (("variant", self.variant, MAC_VARIANTS), ("targets", self.targets, MAC_TARGETS),
                                  ("order", self.order, MAC_ORDERS), ("solver", self.solver, MAC_SOLVERS)):
            if value not in valid:
                raise ConfigError(f"mac.{key} must be one of {valid}, got '{value}'")
        if not 0.0 <= self.strength <= 1.0:
            raise ConfigError(f"mac.strength must be in [0, 1], got {self.strength}")
        if self.damping < 0.0:
            raise ConfigError(f"mac.damping must be >= 0 (relative to the mean diagonal), got {self.damping}")


JCAR_GROUPINGS = JOINT_GROUPINGS


@dataclasses.dataclass(frozen=True)
class JcarConfig:
    """Joint Cross-Attention Reconstruction (carsam.methods.jcar): decoder units spanning coupled branches.

    When enabled, the decoder units are `grouping`'s (instead of `recon.grouping`) and each unit's loss is
    `w_tokens * MSE(queries) + w_image * MSE(keys)`, each a per-stream mean (7 token rows per box vs
    thousands of image rows); `variance_weighting` also divides each stream's MSE by the variance of its
    FP target over the unit's block I/O (a relative error).

    The defaults (chain units, equal stream weights, no variance weighting) are carsam's reading, chosen on
    the decoder-only W4A4 testbed ablation (docs/results.md).
    """

    enabled: bool = False
    grouping: str = "chain"
    w_tokens: float = 1.0
    w_image: float = 1.0
    variance_weighting: bool = False

    def __post_init__(self) -> None:
        if self.grouping not in JCAR_GROUPINGS:
            raise ConfigError(f"jcar.grouping must be one of {JCAR_GROUPINGS}, got '{self.grouping}'")
        if self.w_tokens < 0 or self.w_image < 0 or self.w_tokens + self.w_image == 0:
            raise ConfigError(f"jcar.w_tokens and jcar.w_image must be >= 0 and not both 0, got "
                              f"{self.w_tokens}, {self.w_image}")


TRACKING_MODES = TRACKER_MODES
DIAGNOSTIC_SCOPES = COLLECTOR_SCOPES


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Weights & Biases logging (carsam.tracking). `offline` (default) needs no account or network and
    writes `runs/<run_id>/wandb/offline-run-*` (upload later with `wandb sync`); `disabled` imports
    nothing. `group` gathers runs in W&B (a sweep sets it to its study name)."""

    mode: str = "offline"
    project: str = "carsam"
    entity: str = ""
    group: str = ""

    def __post_init__(self) -> None:
        if self.mode not in TRACKING_MODES:
            raise ConfigError(f"tracking.mode must be one of {TRACKING_MODES}, got '{self.mode}'")


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
    """Attention-dissipation and oscillation diagnostics (carsam.diagnostics), written to
    `runs/<run_id>/diagnostics.parquet` with `diag/*` summaries in the record.

    `images`: how many val images (the first ones with prompts, the same for every run) the attention
    statistics are collected on; `scopes`: `decoder` and/or `encoder`; `iou_threshold`: detector prompt ->
    GT mask matching for the mask mass; `oscillation_window`: smoothing window of the oscillation index;
    `map_images`, `map_prompts`: the token->image attention maps kept for figures and the dashboard
    (`runs/<run_id>/attention_maps.npz`, `carsam.diagnostics.maps`), of the first `map_prompts` prompts
    of the first `map_images` of those images (0 keeps no maps).
    """

    enabled: bool = True
    images: int = 8
    scopes: tuple[str, ...] = ("decoder",)
    iou_threshold: float = 0.5
    oscillation_window: int = 5
    map_images: int = 2
    map_prompts: int = 2

    def __post_init__(self) -> None:
        if self.images < 1:
            raise ConfigError(f"diagnostics.images must be >= 1, got {self.images}")
        unknown = sorted(set(self.scopes) - set(DIAGNOSTIC_SCOPES))
        if unknown or not self.scopes:
            raise ConfigError(f"diagnostics.scopes must be a non-empty subset of {DIAGNOSTIC_SCOPES}, got "
                              f"{list(self.scopes)}")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ConfigError(f"diagnostics.iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if self.oscillation_window < 1:
            raise ConfigError(f"diagnostics.oscillation_window must be >= 1, got {self.oscillation_window}")
        if self.map_images < 0:
            raise ConfigError(f"diagnostics.map_images must be >= 0, got {self.map_images}")
        if self.map_prompts < 0:
            raise ConfigError(f"diagnostics.map_prompts must be >= 0, got {self.map_prompts}")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Stage caching, on disk under `dir` (empty: `<runs_dir>/.cache`), shared by runs, sweep trials and
    worker processes: the FP image embeddings of calibration and evaluation images (carsam.cache.embeddings;
    served only while the image encoder is in full precision), PTQ4SAM's prepared quantized model
    (PTQ4SAM and CAR-SAM runs) and the reconstructed image-encoder units (BRECQ, QDrop, PTQ4SAM and
    CAR-SAM runs with a quantized encoder; both carsam.cache.prepared). Each entry is keyed by exactly
    what it depends on, so a stale entry is never read; `enabled=false` turns all of them off."""

    enabled: bool = True
    dir: str = ""


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """What a run keeps besides its record. `save_model`: write the quantized model into the run folder
    (`model.safetensors` + `quantizers.json`, carsam.export.saved; reload with `carsam.load_quantized`,
    re-evaluate with `carsam eval RUN_DIR`); null (the default) saves it for the methods that train something
    (reconstruction: brecq, qdrop, ptq4sam, carsam), whose model costs most to recompute."""

    save_model: bool | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one `carsam run` needs; written resolved into the run folder."""

    name: str = ""
    method: str = "rtn"
    seed: int = 0
    device: str = "cpu"
    runs_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    quant: QuantConfig = QuantConfig()
    recon: ReconConfig = ReconConfig()
    mac: MacConfig = MacConfig()
    jcar: JcarConfig = JcarConfig()
    tracking: TrackingConfig = TrackingConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()
    cache: CacheConfig = CacheConfig()
    output: OutputConfig = OutputConfig()

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        if not DEVICE_PATTERN.match(self.device):
            raise ConfigError(f"device must be cpu, auto, cuda or cuda:N, got '{self.device}'")
        if self.method not in method_names():
            raise ConfigError(f"method must be one of {method_names()}, got '{self.method}'")
        self._check_testbed_family()
        if get_method(self.method).quantized:
            self.data.check_calibration_paths()
        elif self.output.save_model:
            raise ConfigError(f"output.save_model=true needs a quantizing method; '{self.method}' quantizes nothing "
                              "(its model is the FP checkpoint)")

    def _check_testbed_family(self) -> None:
        """A shipped testbed evaluated on the synthetic data of another shape family is a mistake, not a protocol."""
        if not self.data.is_synthetic or self.model.checkpoint or self.model.type not in SHIPPED_TESTBEDS:
            return
        family, seed = SHIPPED_TESTBEDS[self.model.type].family, SHIPPED_TESTBEDS[self.model.type].seed
        if self.data.synthetic_family != family:
            raise ConfigError(f"model.type={self.model.type} was trained on the '{family}' synthetic family, but "
                              f"data.synthetic_family={self.data.synthetic_family}: add data.synthetic_family={family} "
                              f"(and data.synthetic_seed={seed} for its own splits)")

    @property
    def saves_model(self) -> bool:
        """Whether the run writes its quantized model (`output.save_model`; null: the methods that train)."""
        method = get_method(self.method)
        if self.output.save_model is None:
            return method.trains
        return self.output.save_model and method.quantized


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Return `value` converted to `hint` (lists -> tuples, ints -> floats) or raise ConfigError."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        # a type hint is a class, never a dataclass instance
        return from_dict(cast("type[DataclassInstance]", hint), value, prefix=f"{key}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key} must have {len(args)} items, got {len(value)}")
        return tuple(_check_type(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _check_type(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} has the wrong type: {value!r} is not {hint}")
    return _check_scalar(value, origin or hint, key)


def _check_scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key} must be null, got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; valid keys under "
                          f"'{prefix or '<top>'}': {', '.join(sorted(names))}")
    values = {k: _check_type(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        message = str(err)
        if message.split(" ", 1)[0] in names:  # "field must be ...": name it with its section
            raise ConfigError(f"{prefix}{message}") from err
        raise ConfigError(f"{prefix or 'config'}: {err}") from err


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists) of a config dataclass, ready for YAML/JSON."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(config))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (['a', 'b', 'c'], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. quant.w_bits=6)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err})") from err
    return key.split("."), value


def _merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override key '{'.'.join(path)}': '{part}' is not a section")
        node = child
    node[path[-1]] = value


def load_experiment(path: str | Path) -> dict[str, Any]:
    """Read an experiment YAML into a dict (empty file -> {}), with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"experiment file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    except yaml.YAMLError as err:  # its text spans lines (a caret under the spot): one line here
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"experiment file {path} is not valid YAML ({where}{problem})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"experiment file {path} must hold a mapping of config keys")
    return data


NAMELESS_PREFIXES = ("data.images=", "data.annotations=", "data.prompts=", "data.calib_images=",
                     "data.calib_annotations=", "data.calib_prompts=", "data.synthetic_root=", "model.checkpoint=",
                     "tracking.", "diagnostics.", "cache.", "runs_dir=", "device=", "name=")


def run_name(experiment: str | Path, overrides: typing.Sequence[str]) -> str:
    """The experiment file's stem, then `+key=value` for each override other than paths (files, folders and the
    checkpoint, which the record names with their hashes) and bookkeeping (tracking, diagnostics, caching,
    the device): two runs of one file with different settings never share a name."""
    changes = [o for o in overrides if not o.startswith(NAMELESS_PREFIXES)]
    return "+".join([Path(experiment).stem, *changes])


def resolve(experiment: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Defaults <- experiment YAML <- overrides, validated into a frozen RunConfig. A run whose file and
    overrides give it no name is named by `run_name`."""
    data = load_experiment(experiment) if experiment else {}
    if experiment and not data.get("name"):
        data["name"] = run_name(experiment, overrides)
    for text in overrides:
        _merge(data, *parse_override(text))
    return from_dict(RunConfig, data)


def dump_yaml(config: Any) -> str:
    """The resolved config as YAML text (keys in field order)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
