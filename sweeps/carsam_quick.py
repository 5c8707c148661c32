"""A small CAR-SAM study for `make sweep` on testbed v2: decoder-only W4A4 (image encoder in FP) at a
reduced cost (50 reconstruction steps per unit, 8 calibration images, 60 val images), searching the MAC
strength and variant, the JCAR token weight and the JCAR grouping, beside FP, RTN and PTQ4SAM reference runs
at the same budget (run once). Its mAP is a quick, noisy proxy:
confirm a chosen point with `carsam run experiments/carsam_w4a4.yaml quant.quantize_encoder=false ...`.

    carsam sweep sweeps/carsam_quick.py --trials 8
"""

EXPERIMENT = "../experiments/carsam_w4a4.yaml"
# The first trial: MAC and JCAR at the code defaults (carsam.config.MacConfig / JcarConfig), the reference point
# of the study and the CAR-SAM row of `carsam report`'s ablation tables.
START = [{"mac.strength": 1.0, "mac.variant": "qk", "jcar.w_tokens": 1.0, "jcar.grouping": "chain"}]
# On testbed v2 (docs/testbed.md), where W4A4 RTN and BRECQ collapse and PTQ4SAM keeps under half of FP, so the
# knobs have room to matter; v1 keeps 96% with PTQ4SAM and its trials lie within noise of each other.
FIXED = ["model.type=testbed_v2", "quant.quantize_encoder=false", "recon.iters=50", "data.calib_size=8",
         "data.max_val_images=60"]
# Reference rows at the same budget, run once before the trials (reused while their config is unchanged), so the
# report shows the trials beside FP, RTN and PTQ4SAM (the MAC x JCAR table's baseline).
REFERENCES = {
    "fp": ("../experiments/fp.yaml", FIXED),
    "rtn": ("../experiments/rtn_w4a4.yaml", FIXED),
    "ptq4sam": ("../experiments/ptq4sam_w4a4.yaml", FIXED),
}


def suggest(trial) -> list[str]:
    """One trial's overrides."""
    return [
        *FIXED,
        f"mac.strength={trial.suggest_float('mac.strength', 0.0, 1.0)}",
        f"mac.variant={trial.suggest_categorical('mac.variant', ['qk', 'pv', 'both'])}",
        f"jcar.w_tokens={trial.suggest_float('jcar.w_tokens', 0.1, 10.0, log=True)}",
        f"jcar.grouping={trial.suggest_categorical('jcar.grouping', ['block', 'pair', 'chain'])}",
    ]
