"""CUDA checks (marker `gpu`; skipped, with the reason shown, on a machine without CUDA): where every quantizer,
cache and sample lives; the fused quantizer on the GPU; determinism of a reconstruction with a fixed seed; the
stage cache restoring a CUDA run exactly. `bench/gpu_check.sh` runs them first."""

from __future__ import annotations

import copy

import pytest
import torch

from carsam import pipeline
from carsam.config import ReconConfig, resolve
from carsam.methods.calibrate import calibrate_
from carsam.models.quantize import QuantConfig, quantize_
from carsam.quant.fused import fused_fake_quantize
from carsam.quant.primitives import fake_quantize, integer_range, qparams_from_range
from carsam.quant.quantizers import iter_quantizers
from carsam.recon.block_io import capture_block_io
from carsam.recon.driver import UnitRecipe, prepare_unit_
from carsam.recon.stage import ReconSettings, reconstruct_unit
from carsam.recon.units import find_units
from carsam.testbed.spec import build_testbed_from_checkpoint
from tests.helpers import experiment, real_data_overrides

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh)")]
CUDA = torch.device("cuda")


def _quantized(checkpoint, calib):
    sam = build_testbed_from_checkpoint(checkpoint).to(CUDA)
    quantize_(sam, QuantConfig(w_bits=4, a_bits=4, w_observer="minmax"))
    return calibrate_(sam, calib)


def test_every_quantizer_and_captured_sample_is_where_it_should_be(random_testbed_checkpoint, calib2):
    sam = _quantized(random_testbed_checkpoint, calib2)
    for path, quantizer in iter_quantizers(sam):
        for name, t in [*quantizer.named_buffers(), *quantizer.named_parameters()]:
            if t.numel():
                assert t.device.type == "cuda", f"{path}.{name} is on {t.device}"
    unit = find_units(sam, "attention_mlp")[1]
    block_io = capture_block_io(sam, unit, calib2, inputs="quantized")
    stored = block_io.samples[0]
    assert all(t.device.type == "cpu" for t in (*stored.args, *stored.targets)), "block I/O must be kept on the CPU"
    drawn = block_io.sample(0, CUDA)
    assert all(t.device.type == "cuda" for t in (*drawn.args, *drawn.targets))


def test_fused_fake_quantizer_equals_the_reference_on_cuda():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 300, 64, generator=gen) * 3).to(CUDA)
    scale, zp = qparams_from_range(x.min().cpu() * 0.6, x.max().cpu() * 0.6, 4, False)
    qmin, qmax = integer_range(4, False)
    keep = (torch.rand(x.shape, generator=gen) < 0.5).to(CUDA)
    outs = []
    for fn in (fake_quantize, fused_fake_quantize):
        leaf, s = x.clone().requires_grad_(True), scale.to(CUDA).requires_grad_(True)
        y = fn(leaf, s, zp.to(CUDA), qmin, qmax) if fn is fake_quantize else fn(leaf, s, zp.to(CUDA), qmin, qmax,
                                                                                  None, keep)
        if fn is fake_quantize:
            y = torch.where(keep, y, leaf)
        (y * torch.linspace(-1, 1, y.numel(), device=CUDA).reshape(y.shape)).sum().backward()
        outs.append((y.detach(), leaf.grad, s.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.allclose(outs[0][2], outs[1][2], rtol=1e-6, atol=1e-6)  # reduction order may differ on the GPU


def test_a_reconstruction_with_a_fixed_seed_is_repeatable_on_cuda(random_testbed_checkpoint, calib2):
    base = _quantized(random_testbed_checkpoint, calib2)
    curves = []
    for _ in range(2):
        sam = copy.deepcopy(base)
        unit = find_units(sam, "attention_mlp")[1]
        block_io = capture_block_io(sam, unit, calib2, inputs="quantized")
        prepare_unit_(unit.module(sam), UnitRecipe(learn_act_scales=True, quant_prob=0.5))
        torch.manual_seed(0)
        curves.append(reconstruct_unit(sam, unit, block_io, ReconSettings.from_config(ReconConfig(iters=20))).curve)
    assert curves[0] == curves[1]


def test_the_stage_cache_restores_a_cuda_run_exactly(tmp_path, small_coco, random_testbed_checkpoint):
    def config(*extra):
        return resolve(experiment("carsam_w4a4.yaml"), [
            f"runs_dir={tmp_path / 'runs'}", f"model.checkpoint={random_testbed_checkpoint}", "device=cuda",
            "data.calib_size=2", "data.max_val_images=2", "diagnostics.images=1", "recon.iters=2",
            "recon.interference_images=1", *real_data_overrides(small_coco), *extra])
    first, again = pipeline.run(config()), pipeline.run(config())
    off = pipeline.run(config("cache.enabled=false"))
    assert again.details["cache"]["prepared"]["stages"]["ptq4sam"]["hits"] == 1
    assert again.metrics == first.metrics == off.metrics
