"""One module per command (restore's kinds are in `restore/`); each takes a `Context` and
the command's options."""
