"""What one run lends the code it calls, besides the model, the data and the config: built once by
`carsam.pipeline.run` and passed down as an argument (never through a global or a context variable).

- `embeddings`: the on-disk store of FP image embeddings (`carsam.cache.embeddings.EmbeddingStore`), the
  `source` of every `SamBoxPredictor` the run builds; None runs the encoder on every pass.
- `prepared`: the on-disk store of PTQ4SAM's prepared model and of reconstructed encoder units
  (`carsam.cache.prepared.PreparedStore`); None prepares and reconstructs from scratch.
- `progress`: show progress bars (evaluation, calibration, reconstruction: `carsam.recon.progress`; on a TTY only).

`RunContext()` (no stores) is what library callers and tests use: it computes everything.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from carsam.cache.embeddings import EmbeddingStore
    from carsam.cache.prepared import PreparedStore


@dataclasses.dataclass(frozen=True)
class RunContext:
    """The stores and switches of one run (module docstring)."""

    embeddings: EmbeddingStore | None = None
    prepared: PreparedStore | None = None
    progress: bool = False


__all__ = ["RunContext"]
