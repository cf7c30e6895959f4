"""The report page: one self-contained HTML file (no external scripts, fonts or styles)."""
