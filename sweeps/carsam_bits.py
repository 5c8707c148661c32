"""CAR-SAM (MAC and JCAR on) over weight and activation bit-widths: a two-objective study, mAP up and bits
down, where bits = (w_bits + a_bits) / 2 of the run record. The 3 x 3 grid runs point by point; the study
ends by printing its Pareto front.

    carsam sweep sweeps/carsam_bits.py --trials 9
    carsam sweep sweeps/carsam_bits.py --trials 9 quant.quantize_encoder=false --study carsam_bits_decoder
"""

EXPERIMENT = "../experiments/carsam_w4a4.yaml"
GRID = {"quant.w_bits": [4, 6, 8], "quant.a_bits": [4, 6, 8]}
OBJECTIVES = (("eval/mAP", "maximize"), ("bits", "minimize"))


def suggest(trial) -> list[str]:
    """One trial's overrides."""
    return [f"{key}={trial.suggest_categorical(key, values)}" for key, values in GRID.items()]
