"""Host mechanics: mounts (mount(2) and mountinfo), processes, signals held back and
delivered, and the test pause points."""
