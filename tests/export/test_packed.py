"""The packed low-bit artifact (carsam.export.packed): codes pack and unpack exactly at every width, and the
dequantized weights are the evaluated fake-quant weights bit for bit (AdaRound-baked ones included)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from carsam import cli
from carsam.export.packed import (
    PackError,
    dequantize_packed,
    export_packed,
    pack_codes,
    read_packed_header,
    unpack_codes,
)
from carsam.export.saved import load_quantized, save_quantized
from carsam.models.quantize import QuantConfig, calibrate_weights_, quantize_
from carsam.models.sam import build_model
from carsam.quant.modules import quantized_weight_modules
from carsam.quant.quantizers import QuantMode, UniformQuantizer
from carsam.quant.state import set_quant_mode


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 12, 16])
@pytest.mark.parametrize("numel", [1, 7, 64])
def test_codes_unpack_to_what_was_packed(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(bits * 100 + numel))
    stored = pack_codes(codes, bits)
    assert torch.equal(unpack_codes(stored, bits, numel), codes.to(torch.int32))
    expected_bytes = (numel + 1) // 2 if bits <= 4 else numel if bits <= 8 else 4 * numel
    assert stored.numel() * stored.element_size() == expected_bytes


def test_four_bit_codes_share_a_byte_low_nibble_first():
    assert pack_codes(torch.tensor([0x3, 0xA, 0xF]), 4).tolist() == [0xA3, 0x0F]


def _assert_weights_match(sam, path) -> int:
    weights = dequantize_packed(path)
    layers = {f"{p}.weight": m for p, m in quantized_weight_modules(sam) if isinstance(m.weight_quantizer,
                                                                                      UniformQuantizer)}
    assert set(weights) == set(layers)
    for name, layer in layers.items():
        with torch.no_grad():
            assert torch.equal(weights[name], layer.quantized_weight()), name
    return len(layers)


def test_dequantized_weights_are_the_fake_quant_weights_bit_for_bit(tmp_path, quantized_testbed):
    sam, _ = quantized_testbed
    export_packed(sam, tmp_path / "packed.safetensors", "testbed")
    assert _assert_weights_match(sam, tmp_path / "packed.safetensors") == len(quantized_weight_modules(sam))


def test_baked_adaround_weights_survive_the_round_trip_and_the_file_is_smaller(tmp_path, carsam_run, capsys):
    assert cli.main(["export", str(carsam_run), "--out", str(tmp_path / "p.safetensors")]) == 0
    assert "MB" in capsys.readouterr().out
    sam = load_quantized(carsam_run)
    _assert_weights_match(sam, tmp_path / "p.safetensors")
    header = read_packed_header(tmp_path / "p.safetensors")
    assert {w["bits"] for w in header["weights"].values()} == {4}
    assert any(a["kind"] == "log" for a in header["activations"].values())  # AGQ's tau travels in the header
    fp_bytes = 2 * sum(p.numel() for p in sam.parameters())  # the model in fp16
    assert (tmp_path / "p.safetensors").stat().st_size < 0.5 * fp_bytes


def test_mixed_widths_store_each_layer_at_its_own_width(tmp_path, random_testbed_checkpoint):
    sam = build_model("testbed", random_testbed_checkpoint)
    quant = QuantConfig(w_bits=6, overrides=(("mask_decoder.transformer.layers.0.*", {"w_bits": 3}),))
    quantize_(sam, quant)
    calibrate_weights_(sam)
    set_quant_mode(sam, QuantMode.QUANTIZED)  # weights only: activation quantizers stay uncalibrated
    save_quantized(sam, tmp_path, {"type": "testbed", "checkpoint": "c", "sha256": "s"}, quant, {})
    sam = load_quantized(tmp_path)  # the overrides travel in the manifest
    export_packed(sam, tmp_path / "m.safetensors", "testbed")
    _assert_weights_match(sam, tmp_path / "m.safetensors")
    header = read_packed_header(tmp_path / "m.safetensors")
    widths = {name.startswith("mask_decoder.transformer.layers.0."): w["bits"] for name, w in header["weights"].items()}
    assert widths == {True: 3, False: 6}
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["carsam"])["activations"] == {}
        assert all(handle.get_tensor(k).dtype == torch.float16 for k in handle.keys()
                   if k.endswith("norm1.weight"))


def test_a_model_not_in_quantized_mode_is_not_packed(tmp_path, random_testbed_checkpoint):
    sam = quantize_(build_model("testbed", random_testbed_checkpoint), QuantConfig())
    with pytest.raises(PackError, match="only an evaluated quantized model can be packed"):
        export_packed(sam, tmp_path / "x.safetensors", "testbed")
