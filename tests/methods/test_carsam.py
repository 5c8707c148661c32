"""The `carsam` method: MAC before reconstruction, JCAR units, and PTQ4SAM exactly when both are off."""

from __future__ import annotations

import torch

from carsam.config import JcarConfig, MacConfig, ReconConfig, RunConfig
from carsam.methods.registry import get_method
from carsam.models.quantize import QuantConfig
from carsam.quant.state import assert_eval_ready
from carsam.run_context import RunContext
from carsam.testbed.spec import build_testbed_from_checkpoint

FAST = ReconConfig(iters=5, track_interference=False)
DECODER_ONLY = QuantConfig(quantize_encoder=False)


def _apply(method: str, checkpoint, calib, **sections):
    torch.manual_seed(0)
    sam = build_testbed_from_checkpoint(checkpoint)
    config = RunConfig(method=method, quant=DECODER_ONLY, recon=FAST, **sections)
    return sam, get_method(method).apply(sam, calib, config, RunContext())


def test_carsam_runs_mac_then_jcar_pair_units_and_is_eval_ready(random_testbed_checkpoint, calib2):
    sam, details = _apply("carsam", random_testbed_checkpoint, calib2, mac=MacConfig(enabled=True),
                          jcar=JcarConfig(enabled=True, grouping="pair"))
    assert_eval_ready(sam)
    assert len(details["mac"]["attentions"]) == 3  # both blocks' token->image + the final one
    units = [u["unit"] for u in details["recon"].units]
    assert units == ["decoder.layers.0.self_attn", "decoder.layers.0.pair", "decoder.layers.1.self_attn",
                     "decoder.layers.1.pair", "decoder.final_attn_token_to_image"]
    pair = details["recon"].units[1]
    assert dict(pair["stage"]["stream_weights"]) == {"queries": 1.0, "keys": 1.0}


def test_carsam_with_mac_and_jcar_off_is_ptq4sam(random_testbed_checkpoint, calib2):
    sam_c, carsam = _apply("carsam", random_testbed_checkpoint, calib2)
    sam_p, ptq4sam = _apply("ptq4sam", random_testbed_checkpoint, calib2)
    assert "mac" not in carsam
    assert [u["last"] for u in carsam["recon"].units] == [u["last"] for u in ptq4sam["recon"].units]
    for (name, a), (_, b) in zip(sam_c.state_dict().items(), sam_p.state_dict().items()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name
