"""Stage caching: FP image embeddings on disk are bit-identical to recomputed ones, keyed by exactly what
they depend on, never served to a quantized encoder, robust to corrupt files and concurrent writers."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carsam import pipeline
from carsam.cache.embeddings import EmbeddingStore, encoder_is_fp
from carsam.cache.store import image_file
from carsam.config import resolve
from carsam.data.coco import CocoBoxPrompts
from carsam.eval.inference import ImageEmbedding, SamBoxPredictor
from carsam.methods.calibrate import calibrate_
from carsam.methods.registry import get_method
from carsam.models.quantize import QuantConfig, quantize_
from carsam.models.sam import build_model
from carsam.quant.fp_reference import remember_fp_
from carsam.quant.quantizers import QuantMode
from carsam.quant.state import quant_modes_set, set_quant_mode
from tests.helpers import experiment, real_data_overrides

DECODER_ONLY = "rtn_w4a4_decoder_only.yaml"


def _config(tmp_path, small_coco, checkpoint, name: str = DECODER_ONLY, *overrides: str):
    return resolve(experiment(name), [f"runs_dir={tmp_path / 'runs'}", f"model.checkpoint={checkpoint}",
                                      "data.calib_size=2", "data.max_val_images=3", "diagnostics.images=2",
                                      *real_data_overrides(small_coco), *overrides])


@pytest.fixture(scope="module")
def sam(random_testbed_checkpoint):
    return build_model("testbed", random_testbed_checkpoint)


@pytest.fixture()
def val_copy(tmp_path, small_coco) -> CocoBoxPrompts:
    """The small val set with its images copied under tmp_path (so a test may replace one)."""
    images = shutil.copytree(small_coco["images"], tmp_path / "images")
    return CocoBoxPrompts(images, small_coco["annotations"], small_coco["prompts"])


def _store(tmp_path, checkpoint) -> EmbeddingStore:
    return EmbeddingStore(tmp_path / "cache", pipeline.model_description(resolve(
        overrides=[f"model.checkpoint={checkpoint}"]).model))


def _run_store(config) -> EmbeddingStore:
    """The embedding store a run of `config` would use."""
    return pipeline.make_context(config, get_method(config.method), pipeline.model_description(config.model),
                                 progress=False).embeddings


def _assert_same(a: ImageEmbedding, b: ImageEmbedding) -> None:
    assert torch.equal(a.features, b.features) and a.features.dtype == b.features.dtype
    assert (a.input_size, a.original_size) == (b.input_size, b.original_size)


def test_cached_embedding_is_bit_identical_to_a_recomputed_one(tmp_path, sam, val_copy, random_testbed_checkpoint):
    store = _store(tmp_path, random_testbed_checkpoint)
    predictor = SamBoxPredictor(sam, source=store)
    image_id = val_copy.image_ids[0]
    fresh = predictor.embed(val_copy.load_image(image_id))
    missed, hit = predictor.embed_image(val_copy, image_id), predictor.embed_image(val_copy, image_id)
    assert (store.stats.misses, store.stats.hits) == (1, 1)
    _assert_same(missed, fresh)
    _assert_same(hit, fresh)
    SamBoxPredictor(sam).embed_image(val_copy, image_id)  # a predictor without a source never reads the store
    assert (store.stats.misses, store.stats.hits) == (1, 1)


def test_twin_encoder_in_fp_mode_reads_the_plain_encoders_entries_bitwise(tmp_path, val_copy,
                                                                          random_testbed_checkpoint):
    plain = build_model("testbed", random_testbed_checkpoint)
    twin = quantize_(build_model("testbed", random_testbed_checkpoint), QuantConfig())
    store, image_id = _store(tmp_path, random_testbed_checkpoint), val_copy.image_ids[0]
    written = store.embed(SamBoxPredictor(plain), val_copy, image_id)
    assert encoder_is_fp(twin)
    _assert_same(SamBoxPredictor(twin).embed(val_copy.load_image(image_id)), written)  # why sharing is exact
    _assert_same(store.embed(SamBoxPredictor(twin), val_copy, image_id), written)
    assert (store.stats.misses, store.stats.hits) == (1, 1)


def test_encoder_is_fp_only_in_fp_mode_with_the_original_weights(random_testbed_checkpoint):
    sam = quantize_(build_model("testbed", random_testbed_checkpoint), QuantConfig())
    qkv = sam.image_encoder.blocks[0].attn.qkv
    remember_fp_(qkv, "weight")
    with torch.no_grad():
        qkv.weight.mul_(1.01)  # a method's in-place change (as MAC or baked AdaRound do)
    assert not encoder_is_fp(sam)
    with quant_modes_set(sam, QuantMode.FP):
        assert encoder_is_fp(sam)
    set_quant_mode(sam, QuantMode.CALIBRATE)
    assert not encoder_is_fp(sam)


def test_key_depends_on_checkpoint_and_image_bytes_not_on_a_touch(tmp_path, sam, val_copy, random_testbed_checkpoint):
    store, image_id = _store(tmp_path, random_testbed_checkpoint), val_copy.image_ids[0]
    path = image_file(val_copy, image_id)
    key = store.key(sam, torch.device("cpu"), path)
    os.utime(path, ns=(1, 1))  # touched: re-hashed, same bytes, same key
    assert store.key(sam, torch.device("cpu"), path) == key
    other_model = EmbeddingStore(tmp_path / "cache", {"type": "testbed", "sha256": "0" * 64})
    assert other_model.key(sam, torch.device("cpu"), path) != key
    pixels = np.asarray(Image.open(path).convert("RGB"))
    Image.fromarray(255 - pixels).save(path, format=Image.open(path).format)  # replaced, same size
    assert store.key(sam, torch.device("cpu"), path) != key


def test_replaced_image_misses_and_is_encoded_afresh(tmp_path, sam, val_copy, random_testbed_checkpoint):
    store, predictor = _store(tmp_path, random_testbed_checkpoint), SamBoxPredictor(sam)
    image_id = val_copy.image_ids[0]
    store.embed(predictor, val_copy, image_id)
    path = image_file(val_copy, image_id)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    Image.fromarray(255 - pixels).save(path, format=Image.open(path).format)
    replaced = store.embed(predictor, val_copy, image_id)
    assert (store.stats.misses, store.stats.hits) == (2, 0)
    _assert_same(replaced, predictor.embed(val_copy.load_image(image_id)))


@pytest.mark.parametrize("knob", ["quant.a_bits=8", "quant.w_bits=6", "method=carsam", "method=omse", "seed=3",
                                  "mac.strength=0.3", "mac.variant=qk", "jcar.w_tokens=5.0", "recon.iters=7",
                                  "data.calib_size=3", "diagnostics.images=1", "quant.quantize_decoder=false"])
def test_decoder_knobs_keep_the_key(tmp_path, sam, small_coco, random_testbed_checkpoint, knob):
    base = _config(tmp_path, small_coco, random_testbed_checkpoint)
    changed = _config(tmp_path, small_coco, random_testbed_checkpoint, DECODER_ONLY, knob)
    data = pipeline.load_datasets(base.data, base.seed)
    path = image_file(data.val, data.val.image_ids[0])
    keys = [_run_store(c).key(sam, torch.device("cpu"), path) for c in (base, changed)]
    assert keys[0] == keys[1]


def test_second_run_hits_and_matches_an_uncached_run_exactly(tmp_path, small_coco, random_testbed_checkpoint):
    first = pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint))
    second = pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, DECODER_ONLY, "quant.a_bits=8"))
    again = pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint))
    uncached = pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, DECODER_ONLY,
                                    "cache.enabled=false"))
    assert first.details["cache"]["misses"] > 0 and first.details["cache"]["bypassed"] == 0
    assert second.details["cache"]["misses"] == 0 and second.details["cache"]["hits"] > 0
    assert again.details["cache"]["hits"] == first.details["cache"]["hits"] + first.details["cache"]["misses"]
    assert uncached.details["cache"] == {"enabled": False}
    assert first.metrics == again.metrics == uncached.metrics  # exact: eval and diagnostics


def test_another_checkpoint_misses(tmp_path, small_coco, random_testbed_checkpoint):
    pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, "fp.yaml"))
    shipped = pipeline.run(_config(tmp_path, small_coco, "", "fp.yaml"))
    assert shipped.details["cache"]["hits"] == 0 and shipped.details["cache"]["misses"] > 0


def _poison(store: EmbeddingStore, sam, data) -> list:
    """Store zero features under the FP key of every calib and val image; returns the entry paths."""
    predictor, paths = SamBoxPredictor(sam), []
    for dataset in (data.calib, data.val):
        for image_id in dataset.image_ids:
            real = predictor.embed(dataset.load_image(image_id))
            key = store.key(sam, predictor.device, image_file(dataset, image_id))
            store.save(key, dataclasses.replace(real, features=torch.zeros_like(real.features)))
            paths.append(store.path(key))
    return paths


def test_quantized_encoder_never_reads_or_writes_the_cache(tmp_path, sam, small_coco, random_testbed_checkpoint):
    config = _config(tmp_path, small_coco, random_testbed_checkpoint, "rtn_w4a4.yaml", "diagnostics.enabled=false")
    paths = _poison(_run_store(config), sam, pipeline.load_datasets(config.data, config.seed))
    before = {p: p.read_bytes() for p in paths}
    poisoned = pipeline.run(config)
    clean = pipeline.run(dataclasses.replace(config, cache=dataclasses.replace(config.cache, enabled=False)))
    assert poisoned.metrics == clean.metrics
    assert poisoned.details["cache"]["hits"] == poisoned.details["cache"]["misses"] == 0
    assert poisoned.details["cache"]["bypassed"] > 0
    assert {p: p.read_bytes() for p in paths} == before
    assert len(list((tmp_path / "runs" / ".cache").rglob("*.pt"))) == len(paths)


def test_quantized_pass_ignores_the_cache(tmp_path, val_copy, random_testbed_checkpoint):
    sam = quantize_(build_model("testbed", random_testbed_checkpoint), QuantConfig(quantize_decoder=False))
    store, image_id = _store(tmp_path, random_testbed_checkpoint), val_copy.image_ids[0]
    predictor = SamBoxPredictor(sam)
    set_quant_mode(sam, QuantMode.CALIBRATE)
    predictor.embed(val_copy.load_image(image_id))
    set_quant_mode(sam, QuantMode.QUANTIZED)
    with quant_modes_set(sam, QuantMode.FP):  # the FP pass writes the FP entry
        fp = store.embed(predictor, val_copy, image_id)
    quantized = store.embed(predictor, val_copy, image_id)
    assert (store.stats.misses, store.stats.hits, store.stats.bypassed) == (1, 0, 1)
    assert not torch.equal(quantized.features, fp.features)
    _assert_same(quantized, predictor.embed(val_copy.load_image(image_id)))


def test_corrupt_entry_is_recomputed_with_a_warning(tmp_path, sam, val_copy, random_testbed_checkpoint, caplog):
    store, predictor = _store(tmp_path, random_testbed_checkpoint), SamBoxPredictor(sam)
    image_id = val_copy.image_ids[0]
    good = store.embed(predictor, val_copy, image_id)
    path = store.path(store.key(sam, predictor.device, image_file(val_copy, image_id)))
    for garbage in (b"not a torch file", path.read_bytes()[: len(path.read_bytes()) // 2]):
        path.write_bytes(garbage)
        with caplog.at_level(logging.WARNING, logger="carsam.cache.embeddings"):
            _assert_same(store.embed(predictor, val_copy, image_id), good)
        assert "unreadable entry" in caplog.text
        caplog.clear()
        _assert_same(store.load(store.key(sam, predictor.device, image_file(val_copy, image_id))), good)
    assert (store.stats.corrupt, store.stats.misses) == (2, 3)


def _write_many(directory: str, key: str, times: int) -> None:
    """Worker: write the same entry `times` times (the same bytes as every other worker)."""
    torch.manual_seed(0)
    embedding = ImageEmbedding(torch.randn(1, 256, 16, 16), (96, 128), (120, 160))
    store = EmbeddingStore(directory, {"type": "testbed", "sha256": "x"})
    for _ in range(times):
        store.save(key, embedding)


def test_concurrent_writers_leave_a_valid_entry(tmp_path):
    key = "ab" + "0" * 62
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_many, args=(str(tmp_path), key, 25)) for _ in range(2)]
    for worker in workers:
        worker.start()
    store = EmbeddingStore(tmp_path, {"type": "testbed", "sha256": "x"})
    while any(w.is_alive() for w in workers):
        store.load(key)  # a reader during the writes sees a whole entry or none (never counted corrupt)
        time.sleep(0.01)
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    torch.manual_seed(0)
    expected = torch.randn(1, 256, 16, 16)
    loaded = store.load(key)
    assert loaded is not None and torch.equal(loaded.features, expected) and store.stats.corrupt == 0
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_hooked_encoder_runs_and_bypasses_the_cache(tmp_path, sam, val_copy, random_testbed_checkpoint):
    store, predictor = _store(tmp_path, random_testbed_checkpoint), SamBoxPredictor(sam)
    image_id = val_copy.image_ids[0]
    store.embed(predictor, val_copy, image_id)  # the entry exists
    seen = []
    handle = sam.image_encoder.blocks[1].register_forward_hook(lambda *args: seen.append(1))
    try:
        _assert_same(store.embed(predictor, val_copy, image_id), predictor.embed(val_copy.load_image(image_id)))
    finally:
        handle.remove()
    assert len(seen) == 2 and (store.stats.hits, store.stats.bypassed) == (0, 1)


def test_encoder_units_and_encoder_diagnostics_see_the_encoder_run(tmp_path, small_coco, random_testbed_checkpoint):
    """Reconstruction caches of encoder blocks and encoder-scope diagnostics hook the encoder in their FP
    passes: they must encode, while the decoder units' FP passes read the cache; same numbers as uncached."""
    config = _config(tmp_path, small_coco, random_testbed_checkpoint, "brecq_w4a4.yaml", "recon.iters=2",
                     "recon.track_interference=false", "data.max_val_images=2", "diagnostics.images=1",
                     "diagnostics.scopes=[decoder, encoder]")
    cached = pipeline.run(config)
    clean = pipeline.run(dataclasses.replace(config, cache=dataclasses.replace(config.cache, enabled=False)))
    assert cached.metrics == clean.metrics
    assert cached.details["recon"]["num_units"] == clean.details["recon"]["num_units"]
    assert cached.details["cache"]["hits"] > 0 and cached.details["cache"]["bypassed"] > 0


def test_diagnostics_reuse_the_evaluations_quantized_embeddings_and_match_an_uncached_run(
        tmp_path, small_coco, random_testbed_checkpoint):
    cached = pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, "rtn_w4a4.yaml"))
    uncached = pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, "rtn_w4a4.yaml",
                                    "cache.enabled=false"))
    diagnostics = cached.details["diagnostics"]
    # the statistics pass reuses each diagnostic image's embedding, the maps pass each of its images' again
    assert cached.details["cache"]["reused"] == len(diagnostics["images"]) + len(diagnostics["maps"]["images"]) == 4
    assert cached.metrics == uncached.metrics  # exact: evaluation and every diag/* metric
    from carsam.diagnostics.maps import read_attention_maps

    runs = Path(cached.config["runs_dir"])
    maps = [read_attention_maps(runs / r.run_id) for r in (cached, uncached)]
    np.testing.assert_array_equal(maps[0].q, maps[1].q)  # the reused embeddings give the same maps


def test_kept_quantized_embeddings_are_served_only_while_the_encoder_is_unchanged(tmp_path, val_copy, calib2,
                                                                               random_testbed_checkpoint):
    qsam = build_model("testbed", random_testbed_checkpoint)
    quantize_(qsam, QuantConfig(w_bits=4, a_bits=4))
    calibrate_(qsam, calib2)
    store, image_id = _store(tmp_path, random_testbed_checkpoint), val_copy.image_ids[0]
    predictor = SamBoxPredictor(qsam, source=store)
    with store.keep_quantized(qsam, val_copy, [image_id]):
        first = predictor.embed_image(val_copy, image_id)
        again = predictor.embed_image(val_copy, image_id)
        assert store.stats.reused == 1 and torch.equal(first.features, again.features)
        other = predictor.embed_image(val_copy, val_copy.image_ids[1])  # not a kept image: encoded
        assert store.stats.reused == 1 and other.features.shape == first.features.shape
        with torch.no_grad():
            qsam.image_encoder.blocks[0].mlp.lin1.weight.mul_(1.01)  # a changed encoder is encoded again
        changed = predictor.embed_image(val_copy, image_id)
        assert store.stats.reused == 1 and not torch.equal(changed.features, first.features)
    predictor.embed_image(val_copy, image_id)
    assert store.stats.reused == 1 and store.stats.hits == store.stats.misses == 0
