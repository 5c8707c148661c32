"""CAR-SAM W4A4 with the image encoder in full precision (the decoder-only rows): MAC strength and variant,
the JCAR loss weights and grouping, and the reconstruction length, searched by TPE.

    carsam sweep sweeps/carsam_w4a4.py --trials 40

One trial is one decoder-only CAR-SAM run on the testbed: about 5 min on 2 cores at recon.iters=500
(docs/results.md, "+ both" row), roughly proportional to recon.iters.
"""

EXPERIMENT = "../experiments/carsam_w4a4.yaml"
# The first trial: the code defaults (carsam.config), the reference point of the study.
START = [{"mac.strength": 1.0, "mac.variant": "qk", "jcar.w_tokens": 1.0, "jcar.w_image": 1.0,
          "jcar.grouping": "chain", "recon.iters": 500}]
FIXED = ["quant.quantize_encoder=false"]


def suggest(trial) -> list[str]:
    """One trial's overrides."""
    return [
        *FIXED,
        f"mac.strength={trial.suggest_float('mac.strength', 0.0, 1.0)}",
        f"mac.variant={trial.suggest_categorical('mac.variant', ['qk', 'pv', 'both'])}",
        f"jcar.w_tokens={trial.suggest_float('jcar.w_tokens', 0.1, 10.0, log=True)}",
        f"jcar.w_image={trial.suggest_float('jcar.w_image', 0.1, 10.0, log=True)}",
        f"jcar.grouping={trial.suggest_categorical('jcar.grouping', ['block', 'pair', 'chain'])}",
        f"recon.iters={trial.suggest_categorical('recon.iters', [250, 500, 1000, 2000])}",
    ]
