"""Shared fixtures: private Incus daemons, torn down whatever happens to the tests.

Tests that use `incus_server` or `private_incus_factory`, or carry the `incus` marker, are
skipped with a reason when this machine cannot run a private incusd (not root, no Incus).
At the end of the session every daemon created here is checked for leftovers (processes,
mounts, loop devices, bridges, its directory); any found fails the session loudly.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from harness.cluster import Cluster
from harness.incusd import INCUS, INCUSD, PrivateIncus
from harness.server import IncusServer, prepare_server

log = logging.getLogger(__name__)

INCUS_FIXTURES = frozenset(
    {"incus_server", "private_incus_factory", "module_incus_factory", "incus_cluster"}
)
CLUSTER_SIZE = 3  # members of `incus_cluster` (measured to fit 2 cores: docs/development.md)

_daemons: list[PrivateIncus] = []  # every daemon this session created
_leftovers: list[str] = []  # what the session-finish check found


def incus_unavailable() -> str | None:
    """Why a private incusd cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root to run a private incusd"
    if not os.access(INCUSD, os.X_OK):
        return f"needs Incus: {INCUSD} is missing"
    if shutil.which(INCUS) is None:
        return f"needs Incus: no {INCUS!r} client on PATH"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "incus: needs root and a private incusd (skipped when unavailable)"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests that use the Incus fixtures; skip them all if Incus cannot run here."""
    reason = incus_unavailable()
    for item in items:
        if INCUS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.incus)
        if reason and item.get_closest_marker("incus"):
            item.add_marker(pytest.mark.skip(reason=reason))


def _new_daemon(netns: bool = False) -> PrivateIncus:
    """A fresh (not started) daemon, registered for the atexit fallback and final check;
    with `netns`, in a network namespace of its own."""
    daemon = PrivateIncus(netns=netns)
    _daemons.append(daemon)
    atexit.register(daemon.shutdown)
    return daemon


def _teardown(daemon: PrivateIncus) -> None:
    """Shut ``daemon`` down; the atexit fallback stays armed if this is interrupted."""
    daemon.shutdown()
    atexit.unregister(daemon.shutdown)


@pytest.fixture(scope="session")
def incus_server() -> Iterator[IncusServer]:
    """A prepared private Incus server shared by the whole session."""
    reason = incus_unavailable()
    if reason:
        pytest.skip(reason)
    daemon = _new_daemon()
    try:
        daemon.start()
        yield prepare_server(daemon)
    finally:
        _teardown(daemon)


@contextmanager
def _factory() -> Iterator[Callable[..., PrivateIncus]]:
    """Make (not yet started) private daemons, `make(netns=True)` in a network namespace of
    their own; each is shut down at the end."""
    reason = incus_unavailable()
    if reason:
        pytest.skip(reason)
    made: list[PrivateIncus] = []

    def make(netns: bool = False) -> PrivateIncus:
        made.append(_new_daemon(netns))
        return made[-1]

    try:
        yield make
    finally:
        for daemon in made:
            _teardown(daemon)


@pytest.fixture
def private_incus_factory() -> Iterator[Callable[..., PrivateIncus]]:
    """Make extra private daemons; each is shut down after the test."""
    with _factory() as make:
        yield make


@pytest.fixture(scope="module")
def module_incus_factory() -> Iterator[Callable[..., PrivateIncus]]:
    """Make private daemons shared by a module's tests; each is shut down after the module."""
    with _factory() as make:
        yield make


@pytest.fixture(scope="module")
def incus_cluster() -> Iterator[Cluster]:
    """A prepared cluster of private daemons on 127.0.0.2, .3, ... built once per module."""
    reason = incus_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(_new_daemon)
    try:
        cluster.form(CLUSTER_SIZE)
        yield cluster
    finally:
        cluster.shutdown()
        for daemon in cluster.daemons:
            atexit.unregister(daemon.shutdown)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session if any daemon left something behind (runs after fixture teardown)."""
    for daemon in _daemons:
        _leftovers.extend(f"{daemon.root}: {item}" for item in daemon.leftovers())
    if _leftovers:
        for line in _leftovers:
            log.error("private Incus leftover: %s", line)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _leftovers:
        terminalreporter.section("private Incus leftovers", sep="!", red=True, bold=True)
        for line in _leftovers:
            terminalreporter.write_line(line, red=True, bold=True)
