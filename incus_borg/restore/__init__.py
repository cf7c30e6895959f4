"""What only restore uses: where a run is read from, and one module per restore kind."""
