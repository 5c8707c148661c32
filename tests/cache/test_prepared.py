"""Stage caching of PTQ4SAM's preparation: a restored prepared model is bit-identical to a prepared one
(state, quantizer modes, details, RNG state, whole-run metrics), keyed by exactly what preparation
depends on, and robust to corrupt or ill-fitting entries and to models it cannot key."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from carsam import pipeline
from carsam.cache.prepared import PreparedStore
from carsam.config import ReconConfig, RunConfig, resolve
from carsam.data.coco import CocoBoxPrompts
from carsam.methods.ptq4sam import prepare_ptq4sam_
from carsam.methods.registry import get_method
from carsam.models.quantize import QuantConfig, quantize_
from carsam.quant.quantizers import QuantMode
from carsam.quant.state import quant_modes, set_quant_mode
from carsam.recon.driver import UnitRecipe, encoder_stage_fields, recon_units
from carsam.run_context import RunContext
from carsam.testbed.spec import build_testbed_from_checkpoint
from tests.helpers import experiment, real_data_overrides

ENCODER_AND_DECODER = RunConfig(method="ptq4sam", quant=QuantConfig(w_bits=4, a_bits=4))


def _store(tmp_path, checkpoint) -> PreparedStore:
    return PreparedStore(tmp_path / "cache", {"type": "testbed", "sha256": f"sha-of-{checkpoint.name}"})


def _prepare(checkpoint, calib, config: RunConfig = ENCODER_AND_DECODER, store: PreparedStore | None = None,
             seed: int = 0):
    """A fresh FP testbed prepared by PTQ4SAM (through `store` if given); its details and the RNG after."""
    sam = build_testbed_from_checkpoint(checkpoint)
    torch.manual_seed(seed)
    details = prepare_ptq4sam_(sam, calib, config, RunContext(prepared=store))
    return sam, details, torch.get_rng_state()


def _assert_same_model(a, b) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for name, value in state_a.items():
        assert torch.equal(value, state_b[name]) if isinstance(value, torch.Tensor) else value == state_b[name], name
    assert quant_modes(a) == quant_modes(b)
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]


def test_restored_preparation_is_bit_identical_to_computing_it(tmp_path, random_testbed_checkpoint, calib2):
    store = _store(tmp_path, random_testbed_checkpoint)
    plain, plain_details, plain_rng = _prepare(random_testbed_checkpoint, calib2)
    cold, cold_details, cold_rng = _prepare(random_testbed_checkpoint, calib2, store=store)
    warm, warm_details, warm_rng = _prepare(random_testbed_checkpoint, calib2, store=store)
    assert (store.stats.misses, store.stats.hits) == (1, 1)
    assert plain_details == cold_details == warm_details
    assert len(warm_details["big"]) == 3  # BIG looked at every decoder token->image attention
    assert {type(a.pv_matmul.lhs_quantizer).__name__ for a in
            (warm.get_submodule(p) for p in warm_details["agq"])} == {"LogQuantizer"}
    _assert_same_model(plain, cold)
    _assert_same_model(plain, warm)
    assert torch.equal(plain_rng, warm_rng) and torch.equal(plain_rng, cold_rng)


def test_key_follows_bits_calibration_images_and_rng_state(tmp_path, random_testbed_checkpoint, small_coco, calib2):
    store = _store(tmp_path, random_testbed_checkpoint)
    sam = build_testbed_from_checkpoint(random_testbed_checkpoint)
    fields = {"quant": {"a_bits": 4}, "agq_encoder": False}

    def key(stage_fields=fields, calib=calib2, seed=0):
        torch.manual_seed(seed)
        return store.key(sam, "ptq4sam", stage_fields, calib)

    pool = CocoBoxPrompts(small_coco["calib_images"], small_coco["calib_annotations"], None, prompt_source="gt_boxes")
    other_calib = pool.subset(2, seed=1, require_prompts=True)
    assert other_calib.image_ids != calib2.image_ids
    base = key()
    assert key() == base
    assert key({"quant": {"a_bits": 6}, "agq_encoder": False}) != base
    assert key({"quant": {"a_bits": 4}, "agq_encoder": True}) != base
    assert key(calib=other_calib) != base
    assert key(seed=1) != base
    assert PreparedStore(tmp_path, {"type": "testbed", "sha256": "other"}).key(sam, "ptq4sam", fields, calib2) != base


def test_model_without_a_checkpoint_hash_is_prepared_without_the_cache(tmp_path, random_testbed_checkpoint, calib2):
    store = PreparedStore(tmp_path / "cache", {"type": "testbed", "sha256": "missing"})
    _prepare(random_testbed_checkpoint, calib2, store=store)
    assert (store.stats.bypassed, store.stats.misses, store.stats.hits) == (1, 0, 0)
    assert not (tmp_path / "cache").exists()


def test_corrupt_entry_is_prepared_again_and_rewritten(tmp_path, random_testbed_checkpoint, calib2, caplog):
    store = _store(tmp_path, random_testbed_checkpoint)
    plain, _, _ = _prepare(random_testbed_checkpoint, calib2)
    _prepare(random_testbed_checkpoint, calib2, store=store)
    [entry] = list((tmp_path / "cache").rglob("*.pt"))
    entry.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="carsam.cache.prepared"):
        again, _, _ = _prepare(random_testbed_checkpoint, calib2, store=store)
    assert "unusable entry" in caplog.text and store.stats.corrupt == 1 and store.stats.misses == 2
    _assert_same_model(plain, again)
    _prepare(random_testbed_checkpoint, calib2, store=store)
    assert store.stats.hits == 1  # the rewritten entry serves the next run


def test_entry_that_does_not_fit_the_model_stops_with_the_file_named(tmp_path, random_testbed_checkpoint, calib2):
    store = _store(tmp_path, random_testbed_checkpoint)
    _prepare(random_testbed_checkpoint, calib2, store=store)
    [path] = list((tmp_path / "cache").rglob("*.pt"))
    payload = torch.load(path, weights_only=True)
    dropped = next(k for k in payload["state"] if k.endswith("weight_quantizer.scale"))
    del payload["state"][dropped]
    torch.save(payload, path)
    with pytest.raises(RuntimeError, match=r"does not fit the model.*quantizer entries missing"):
        _prepare(random_testbed_checkpoint, calib2, store=store)


def _config(tmp_path, small_coco, checkpoint, *overrides: str):
    return resolve(experiment("carsam_w4a4.yaml"), [
        f"runs_dir={tmp_path / 'runs'}", f"model.checkpoint={checkpoint}", "data.calib_size=2",
        "data.max_val_images=2", "diagnostics.images=1", "recon.iters=2", "recon.interference_images=1",
        "mac.variant=qk", "quant.quantize_encoder=false", *real_data_overrides(small_coco), *overrides])


def test_a_restored_run_matches_an_uncached_run_exactly(tmp_path, small_coco, random_testbed_checkpoint):
    runs = {name: pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, *overrides))
            for name, overrides in {"first": [], "again": [], "off": ["cache.enabled=false"]}.items()}
    prepared = {name: r.details["cache"].get("prepared") for name, r in runs.items()}
    assert prepared["first"]["stages"]["ptq4sam"]["misses"] == 1 and prepared["again"]["stages"]["ptq4sam"]["hits"] == 1
    assert prepared["off"] is None
    assert runs["again"].metrics == runs["off"].metrics == runs["first"].metrics  # exact, eval and diagnostics


def _reconstruct(checkpoint, calib, store: PreparedStore | None):
    """PTQ4SAM W4A4 (encoder and decoder, 2 steps per unit) on a fresh testbed, through `store` if given."""
    config = dataclasses.replace(ENCODER_AND_DECODER, recon=ReconConfig(iters=2, interference_images=1))
    sam = build_testbed_from_checkpoint(checkpoint)
    torch.manual_seed(0)
    details = get_method("ptq4sam").apply(sam, calib, config, RunContext(prepared=store))
    return sam, details["recon"], torch.get_rng_state()


def test_restored_encoder_reconstruction_is_bit_identical(tmp_path, random_testbed_checkpoint, calib2):
    """The first run through the store computes (exactly as without one) and stores; the second restores."""
    store = _store(tmp_path, random_testbed_checkpoint)
    cold, cold_recon, cold_rng = _reconstruct(random_testbed_checkpoint, calib2, store)
    warm, warm_recon, warm_rng = _reconstruct(random_testbed_checkpoint, calib2, store)
    assert store.stage_stats["recon_encoder"].hits == 1 and store.stage_stats["ptq4sam"].hits == 1
    _assert_same_model(cold, warm)  # after finish_: every baked weight, step and qparam
    assert torch.equal(cold_rng, warm_rng)
    drop = lambda r: json.loads(json.dumps({k: v for k, v in r.items() if k not in ("seconds", "cached")}))  # noqa: E731
    encoder = [r for r in warm_recon.units if r["kind"] == "encoder_block"]
    assert len(encoder) == 4 and all(r["cached"] for r in encoder)  # the testbed's 4 encoder blocks
    assert not any(r.get("cached") for r in warm_recon.units if r not in encoder)
    assert not any(r.get("cached") for r in cold_recon.units)
    assert [drop(r) for r in cold_recon.units] == [drop(r) for r in warm_recon.units]
    assert cold_recon.interference == warm_recon.interference


def test_encoder_stage_key_follows_the_encoder_state_and_the_settings(tmp_path, random_testbed_checkpoint, calib2):
    sam = build_testbed_from_checkpoint(random_testbed_checkpoint)
    quantize_(sam, QuantConfig(w_bits=4, a_bits=4))
    units = recon_units(sam, ReconConfig())
    base = encoder_stage_fields(sam, ReconConfig(), UnitRecipe(), units)
    decoder_only_fields = ReconConfig(grouping="block", track_interference=False, interference_images=2)
    assert encoder_stage_fields(sam, decoder_only_fields, UnitRecipe(), units) == base
    assert encoder_stage_fields(sam, ReconConfig(iters=7), UnitRecipe(), units) != base
    assert encoder_stage_fields(sam, ReconConfig(), UnitRecipe(quant_prob=0.5), units) != base
    set_quant_mode(sam.image_encoder, QuantMode.CALIBRATE)  # quantize_ leaves FP: a mode outside the state dict
    assert encoder_stage_fields(sam, ReconConfig(), UnitRecipe(), units) != base
    base = encoder_stage_fields(sam, ReconConfig(), UnitRecipe(), units)
    sam.image_encoder.blocks[0].attn.qkv.input_quantizer.bits = 6  # a setting outside the state dict
    assert encoder_stage_fields(sam, ReconConfig(), UnitRecipe(), units) != base
    base = encoder_stage_fields(sam, ReconConfig(), UnitRecipe(), units)
    with torch.no_grad():
        sam.image_encoder.blocks[0].attn.qkv.weight.add_(1e-3)
    assert encoder_stage_fields(sam, ReconConfig(), UnitRecipe(), units) != base


def test_a_mac_knob_trial_with_a_quantized_encoder_restores_both_stages(tmp_path, small_coco,
                                                                      random_testbed_checkpoint):
    first, knob = (pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, "quant.quantize_encoder=true",
                                        f"mac.strength={s}")) for s in (0.5, 1.0))
    assert {k: v["misses"] for k, v in first.details["cache"]["prepared"]["stages"].items()} == \
        {"ptq4sam": 1, "recon_encoder": 1}
    assert {k: v["hits"] for k, v in knob.details["cache"]["prepared"]["stages"].items()} == \
        {"ptq4sam": 1, "recon_encoder": 1}
    assert first.metrics != knob.metrics  # the knob still matters: only the knob-free stages were shared
