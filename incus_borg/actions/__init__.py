"""One module per command: each takes parsed options and does the work."""
