"""Test harness: private Incus daemons, a tiny busybox image and a prepared test server."""
