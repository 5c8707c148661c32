"""The config resolves defaults <- YAML <- overrides, and rejects what it cannot honour."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from carsam.config import (
    ConfigError,
    JcarConfig,
    MacConfig,
    RunConfig,
    dump_yaml,
    from_dict,
    parse_override,
    resolve,
    to_dict,
)


def _write(tmp_path, text: str):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_resolve_to_rtn_w4a4_on_testbed():
    config = resolve()
    assert (config.method, config.quant.w_bits, config.quant.a_bits, config.model.type) == ("rtn", 4, 4, "testbed")


def test_overrides_win_over_experiment_file(tmp_path):
    exp = _write(tmp_path, "method: rtn\nquant: {w_bits: 8, a_bits: 8}\n")
    config = resolve(exp, ["quant.a_bits=6", "data.max_val_images=5"])
    assert (config.quant.w_bits, config.quant.a_bits, config.data.max_val_images) == (8, 6, 5)
    assert config.name == "exp+quant.a_bits=6+data.max_val_images=5"  # named after the file and its overrides


def test_unknown_key_raises_and_names_it(tmp_path):
    with pytest.raises(ConfigError, match="quant.w_bitz"):
        resolve(_write(tmp_path, "quant: {w_bitz: 4}\n"))
    with pytest.raises(ConfigError, match="bogus"):
        resolve(None, ["bogus.strength=0.5"])
    with pytest.raises(ConfigError, match="mac.strength"):
        resolve(None, ["mac.strength=1.5"])
    with pytest.raises(ConfigError, match="jcar.grouping"):
        resolve(None, ["jcar.grouping=attention_mlp"])
    with pytest.raises(ConfigError, match=r"^quant\.rel_pos_query must be one of"):  # the section named once
        resolve(None, ["quant.rel_pos_query=bogus"])
    for key in ("diagnostics.map_images", "diagnostics.map_prompts"):
        with pytest.raises(ConfigError, match=rf"^{key} must be >= 0"):
            resolve(None, [f"{key}=-1"])


@pytest.mark.parametrize("override", ["quant.w_bits=four", "quant.w_bits=4.5", "seed=true", "method=3"])
def test_wrong_type_raises(override):
    with pytest.raises(ConfigError):
        resolve(None, [override])


@pytest.mark.parametrize("bits", [1, 17, 0, -4])
def test_bits_out_of_range_raise(bits):
    with pytest.raises(ConfigError, match="2..16"):
        resolve(None, [f"quant.a_bits={bits}"])


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ConfigError, match="rtn"):
        resolve(None, ["method=magic"])


def test_real_model_needs_checkpoint():
    with pytest.raises(ConfigError, match="model.checkpoint"):
        resolve(None, ["model.type=vit_b"])


def test_real_data_path_needs_calibration_files_for_methods_that_calibrate():
    paths = ["data.images=/x", "data.annotations=/y.json", "data.prompts=/p.json"]
    with pytest.raises(ConfigError, match="calib_images"):
        resolve(None, paths)  # rtn calibrates
    assert resolve(None, [*paths, "method=fp"]).data.calib_images == ""  # fp does not


def test_int_is_accepted_for_float_and_lists_become_tuples():
    @dataclasses.dataclass(frozen=True)
    class Box:
        alpha: float = 0.5
        sizes: tuple[int, ...] = ()

    box = from_dict(Box, {"alpha": 1, "sizes": [1, 2]})
    assert box.alpha == 1.0 and isinstance(box.alpha, float) and box.sizes == (1, 2)


def test_overrides_of_quant_layers_round_trip_through_yaml(tmp_path):
    exp = _write(tmp_path, "quant:\n  overrides:\n    - ['mask_decoder.transformer.layers.0.*', {w_bits: 8}]\n")
    config = resolve(exp)
    assert config.quant.overrides == (("mask_decoder.transformer.layers.0.*", {"w_bits": 8}),)
    again = resolve(_write(tmp_path, dump_yaml(config)))
    assert to_dict(again) == to_dict(config)


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=0.25") == (["a", "b"], 0.25)
    assert parse_override("flag=false") == (["flag"], False)
    with pytest.raises(ConfigError):
        parse_override("no_equals_sign")


def test_missing_or_malformed_experiment_file_raises(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        resolve(_write(tmp_path, "- a\n- b\n"))


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().seed = 3  # type: ignore[misc]


EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").rglob("*.yaml"))


def test_the_experiments_folder_is_not_empty():
    assert len(EXPERIMENTS) >= 20


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_experiment_resolves_and_round_trips(path, tmp_path):
    config = resolve(path)
    assert config.name == path.stem
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(config))
    assert resolve(again) == config  # the dumped config names itself


@pytest.mark.parametrize("bits", ["w4a4", "w6a6"])
def test_carsam_experiments_run_mac_and_jcar_at_the_code_defaults(bits):
    config = resolve(Path(__file__).resolve().parents[1] / "experiments" / f"carsam_{bits}.yaml")
    assert config.mac == MacConfig(enabled=True) and config.jcar == JcarConfig(enabled=True)


def test_gt_box_experiments_follow_carsams_protocol_and_the_rest_the_detector_protocol():
    gt = [p for p in EXPERIMENTS if p.parent.name == "gt_boxes"]
    assert len(gt) >= 7
    assert {resolve(p).data.prompt_source for p in gt} == {"gt_boxes"}
    assert all(resolve(p).data.calib_size == 32 for p in gt)
    others = [p for p in EXPERIMENTS if p.parent.name == "experiments" and p.stem != "box_as_mask"]
    assert {resolve(p).data.prompt_source for p in others} == {"detector"}


def test_a_shipped_testbed_on_another_shape_family_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"trained on the 'glyphs' synthetic family.*data.synthetic_family=glyphs "
                                          r"\(and data.synthetic_seed=1"):
        resolve(None, ["model.type=testbed_v2_glyphs"])
    with pytest.raises(ConfigError, match="trained on the 'shapes' synthetic family"):
        resolve(None, ["data.synthetic_family=glyphs"])
    assert resolve(None, ["model.type=testbed_v2_glyphs", "data.synthetic_family=glyphs"]).data.synthetic_seed == 0
    # another seed of the same family is a legitimate second dataset; a user checkpoint is the user's to judge
    assert resolve(None, ["data.synthetic_seed=1"]).model.type == "testbed"
    assert resolve(None, ["data.synthetic_family=glyphs", "model.checkpoint=/some/file.pth"]).model.checkpoint


@pytest.mark.parametrize(("override", "message"), [("recon.max_boxes_per_step=0", "max_boxes_per_step must be >= 1"),
                                                   ("recon.cache_dtype=int8", "cache_dtype must be one of")])
def test_memory_settings_out_of_range_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve(None, [override])


def test_the_sam2_experiments_cover_every_method_on_the_sam2_testbed():
    sam2 = {p.stem: resolve(p) for p in EXPERIMENTS if p.parent.name == "sam2"}
    assert {c.method for c in sam2.values()} == {"fp", "rtn", "omse", "brecq", "qdrop", "ptq4sam", "carsam"}
    assert {c.model.type for c in sam2.values()} == {"sam2_testbed"}
    for stem, config in sam2.items():  # each is its SAM v1 namesake on the other model
        if stem != "fp":
            namesake = resolve(Path(__file__).resolve().parents[1] / "experiments" / f"{stem}.yaml")
            assert dataclasses.replace(config, model=namesake.model) == namesake


@pytest.mark.parametrize(("model_type", "checkpoint", "expected"), [
    ("sam2_testbed", "", False),  # its multimask tokens are untrained: SAM2_TESTBED_STABILITY_FALLBACK
    ("sam2_t", "x.pt", True),  # the real checkpoints keep build_sam2's default
    ("testbed", "", None),  # SAM v1 has no such fallback
])
def test_sam2_stability_fallback_resolves_to_the_models_own_default(model_type, checkpoint, expected):
    overrides = [f"model.type={model_type}"] + ([f"model.checkpoint={checkpoint}"] if checkpoint else [])
    assert resolve(None, overrides).model.sam2_stability_fallback is expected
    if expected is not None:  # an explicit value wins
        assert resolve(None, [*overrides, f"model.sam2_stability_fallback={not expected}"]
                       ).model.sam2_stability_fallback is (not expected)


def test_sam2_stability_fallback_off_on_sam_v1_raises():
    with pytest.raises(ConfigError, match="applies to SAM2 only"):
        resolve(None, ["model.sam2_stability_fallback=false"])
