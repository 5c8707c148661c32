"""Diagnostics of a quantized SAM: attention dissipation and reconstruction oscillation.

- `attention`: pure functions on softmax probabilities (normalised entropy, KL, mask mass) and the
  downsampling of GT masks onto the image-embedding token grid;
- `oscillation`: indices of reconstruction loss curves and the cross-branch interference between units;
- `collector`: `collect_attention_stats`, the FP-vs-quantized statistics of every attention twin,
  captured by forward pre-hooks on the twins' `pv_matmul`;
- `writer`: `runs/<run_id>/diagnostics.parquet` (long format) and the `diag/*` summary metrics;
- `statistics`: FP activation statistics of any SAM (`carsam stats`): decoder attention input ranges,
  probabilities below a 4-bit step, the keys' bimodality, encoder per-channel outliers.

Importing this package imports none of its modules and has no side effects.
"""
