"""RTN over weight and activation bit-widths on the testbed: the full 3 x 3 grid."""

EXPERIMENT = "../experiments/rtn_w4a4.yaml"
GRID = {"quant.w_bits": [4, 6, 8], "quant.a_bits": [4, 6, 8]}


def suggest(trial) -> list[str]:
    """One trial's overrides."""
    return [f"{key}={trial.suggest_categorical(key, values)}" for key, values in GRID.items()]
