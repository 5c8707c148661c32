"""Run records -> long table -> ablation tables (Markdown, LaTeX, CSV), figures, and the offline dashboard.

Reads only the run folders (`carsam.record`), never W&B: `records` (records -> long table), `tables`
(ablation tables and the report folder), `format` (cell text, Markdown, LaTeX), `attention`
(dissipation and oscillation tables), `figures`, `dashboard` (+ its template `dashboard.html`), and
`statistics` (the `carsam stats` folder: summary tables, figure, provenance).
"""
