"""Reconstruction machinery: units (`units`), the decoder's step decomposition and span units (`spans`),
block I/O cache (`cache`), losses and schedules, the Lightning stage that reconstructs one unit
(`stage`), and the per-step error record of cross-branch interference (`interference`). No
method-specific logic lives here."""
