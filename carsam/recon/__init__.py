"""Block reconstruction: units (`units`), the decoder's step decomposition and span units (`spans`), the
block I/O of a unit over the calibration set (`block_io`), losses and schedules, the Lightning stage that
reconstructs one unit (`stage`), the per-step error record of cross-branch interference (`interference`),
and the unit loop that drives them (`driver`). What a method makes learnable in a unit is its
`driver.UnitRecipe`; the methods themselves live in `carsam.methods`."""
