"""Reconstruction machinery: units (`units`), block I/O cache (`cache`), losses and schedules, and the
Lightning stage that reconstructs one unit (`stage`). No method-specific logic lives here."""
