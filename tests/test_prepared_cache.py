"""Stage caching of PTQ4SAM's preparation: a restored prepared model is bit-identical to a prepared one
(state, quantizer modes, details, RNG state, whole-run metrics), keyed by exactly what preparation
depends on, and robust to corrupt or ill-fitting entries and to models it cannot key."""

from __future__ import annotations

import logging

import pytest
import torch

from carsam import pipeline
from carsam.config import RunConfig, resolve
from carsam.data.coco import CocoBoxPrompts
from carsam.methods.ptq4sam import prepare_ptq4sam_
from carsam.models.quantize import QuantConfig
from carsam.models.sam import build_testbed_from_checkpoint
from carsam.prepared_cache import PreparedStore, active_prepared_store, prepared_source
from carsam.quant.quantizers import quant_modes
from tests.conftest import experiment, real_data_overrides

ENCODER_AND_DECODER = RunConfig(method="ptq4sam", quant=QuantConfig(w_bits=4, a_bits=4))


def _store(tmp_path, checkpoint) -> PreparedStore:
    return PreparedStore(tmp_path / "cache", {"type": "testbed", "sha256": f"sha-of-{checkpoint.name}"})


def _prepare(checkpoint, calib, config: RunConfig = ENCODER_AND_DECODER, store: PreparedStore | None = None,
             seed: int = 0):
    """A fresh FP testbed prepared by PTQ4SAM (through `store` if given); its details and the RNG after."""
    sam = build_testbed_from_checkpoint(checkpoint)
    torch.manual_seed(seed)
    with prepared_source(store):
        details = prepare_ptq4sam_(sam, calib, config)
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
    assert active_prepared_store() is None


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
    with caplog.at_level(logging.WARNING, logger="carsam.prepared_cache"):
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
        "data.max_val_images=2", "diagnostics.enabled=false", "recon.iters=2", "recon.interference_images=1",
        "mac.variant=qk", "quant.quantize_encoder=false", *real_data_overrides(small_coco), *overrides])


def test_decoder_knob_trials_share_one_preparation_and_match_uncached_runs(tmp_path, small_coco,
                                                                         random_testbed_checkpoint):
    runs = {name: pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, *overrides))
            for name, overrides in {"first": ["mac.strength=0.5"], "knob": ["mac.strength=1.0"],
                                    "again": ["mac.strength=0.5"],
                                    "off": ["mac.strength=0.5", "cache.enabled=false"]}.items()}
    prepared = {name: r.details["cache"].get("prepared") for name, r in runs.items()}
    assert prepared["first"]["misses"] == 1 and prepared["knob"]["hits"] == 1 and prepared["again"]["hits"] == 1
    assert prepared["off"] is None
    assert runs["first"].metrics == runs["again"].metrics == runs["off"].metrics  # exact
