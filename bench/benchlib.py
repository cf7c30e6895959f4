"""Shared pieces of the benchmarks: a scratch area, a private Incus filled with data, timed
commands, a free-space sampler and table printing.

Not part of the test suite. Everything lives below one temporary directory (default under
/tmp) and is removed on exit, including on failure, Ctrl-C, SIGTERM or SIGHUP:

    <top>/data.img, <top>/data/   an ext4 loop filesystem holding only the Incus side
                                  (the private daemon's root, staging), so that its free
                                  space shows the extra disk a method needs
    <top>/out/                    repositories, tarballs and exports (on the host's disk)
    <top>/borg-base/              BORG_BASE_DIR: borg's caches and security dir
    <top>/logs/                   stdout and stderr of every command
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the private-incusd harness and cli helpers

from cli import PASSPHRASE, incus_config  # noqa: E402
from harness.incusd import PrivateIncus, children  # noqa: E402
from harness.server import BTRFS_POOL, DEFAULT_POOL, IncusServer, prepare_server  # noqa: E402

GB = 1e9
MB = 1e6
MiB = 1 << 20
GiB = 1 << 30

# Trees of many small files copied from the host into every container, like a distribution's
# /usr (identical in every container, as when they come from one image). Missing ones are
# skipped.
BASE_TREES = ("/usr/lib/python3.11", "/usr/lib/python3", "/usr/share/perl", "/usr/share/i18n")
SMALL_FILES = 5000  # unique small files per container at scale 1
LARGE_MIB = 100  # each of the two large files per container at scale 1, MiB


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which command and why."""


# --- signals -----------------------------------------------------------------------------

_forwarded = threading.Event()  # SIGTERM/SIGHUP came to us only, not to our children


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _forwarded.set()
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP interrupt the benchmark like Ctrl-C, so that cleanup runs; Ctrl-C
    works even when the shell started us with SIGINT ignored (a background job)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


@contextmanager
def shielded() -> Iterator[None]:
    """Ignore interrupting signals while cleaning up, so that cleanup completes."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# --- commands ----------------------------------------------------------------------------


@dataclass
class Done:
    """A finished command."""

    argv: list[str]
    returncode: int
    seconds: float
    stdout: str
    stderr: str


class Runner:
    """Runs commands with their output in log files; an interrupt lets the child clean up."""

    def __init__(self, logs: Path, env: Mapping[str, str]) -> None:
        self.logs = logs
        self.env = dict(env)
        self.count = 0

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        ok: Sequence[int] = (0,),
        timeout: float = 3600,
        stamp: bool = False,
        discard: bool = False,
    ) -> Done:
        """Run `argv` to completion and time it; raise BenchError on an exit code not in `ok`.

        With `stamp`, every stderr line is prefixed with the seconds since the start; with
        `discard`, stdout goes to /dev/null.
        """
        self.count += 1
        stem = self.logs / f"{self.count:03d}-{Path(argv[0]).name}"
        out_path, err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        full_env = {**self.env, **(env or {})}
        with out_path.open("wb") as out, err_path.open("wb") as err:
            started = time.monotonic()
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if discard else out,
                stderr=subprocess.PIPE if stamp else err,
                env=full_env,
                cwd=cwd,
            )
            copier = None
            if stamp:
                copier = threading.Thread(target=_stamp, args=(proc, err, started), daemon=True)
                copier.start()
            try:
                code = proc.wait(timeout)
            except BaseException:
                stop_child(proc)
                raise
            finally:
                if copier is not None:
                    copier.join(10)
            seconds = time.monotonic() - started
        done = Done(
            list(argv),
            code,
            seconds,
            out_path.read_text(errors="replace"),
            err_path.read_text(errors="replace"),
        )
        if code not in ok:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise BenchError(f"{shlex.join(done.argv)} exited {code}:\n{tail}")
        return done


def _stamp(proc: subprocess.Popen[bytes], err: IO[bytes], started: float) -> None:
    """Copy `proc`'s stderr to `err`, each line prefixed with the seconds since `started`."""
    assert proc.stderr is not None
    for line in proc.stderr:
        err.write(f"{time.monotonic() - started:9.3f} ".encode() + line)
    err.flush()


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc), parents first."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        tree.append(current)
        todo += children(current)
    return tree


def signal_tree(pids: Sequence[int], sig: signal.Signals) -> None:
    """Send `sig` to each of `pids` that still exists."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue


def stop_child(proc: subprocess.Popen[bytes]) -> None:
    """Let an interrupted child finish its own cleanup (incus-borg undoes its quiesce on
    SIGINT/SIGTERM); kill it as a last resort.

    Ctrl-C reaches the whole foreground process group, children included. When only we got
    SIGTERM or SIGHUP, the child's whole process tree gets SIGTERM now, as Ctrl-C would have
    given it SIGINT: signalling incus-borg alone while its borg runs makes it hang (see
    bench/README.md).
    """
    with shielded():
        if _forwarded.is_set():
            signal_tree(process_tree(proc.pid), signal.SIGTERM)
        try:
            proc.wait(300)
        except subprocess.TimeoutExpired:
            print(f"bench: {proc.args!r} did not stop: killing it", file=sys.stderr)
            signal_tree(process_tree(proc.pid), signal.SIGKILL)
            proc.wait()


# --- measuring ---------------------------------------------------------------------------


class Sampler:
    """Samples, every `interval` seconds in a thread, the free space of some filesystems and
    the CPU time of a process that may be replaced while it runs (incusd is restarted by
    incus-borg: `pid_of` returns the current pid).

    `peak_extra()` is the largest drop of free space, summed over the filesystems at one
    sample, relative to the first sample, minus the growth of the allocated size of the
    `images` at that sample: a loop image on one sampled filesystem holding another sampled
    filesystem (the btrfs pool) would otherwise count twice, and btrfs, committing every 30 s,
    also grows its sparse image into fresh blocks without using more space inside.
    `extra_at_end()` is the same at the last sample. `cpu()` sums, over every pid seen, its
    CPU time at the last sample minus at the first.
    """

    def __init__(
        self,
        paths: Mapping[str, Path],
        pid_of: Callable[[], int | None] = lambda: None,
        images: Sequence[Path] = (),
        interval: float = 0.1,
    ) -> None:
        self.paths = dict(paths)
        self.images = list(images)
        self.pid_of = pid_of
        self.interval = interval
        self.baseline = self._free()
        self.image_baseline = self._allocated()
        self.image_growth = 0
        self.peak: dict[str, int] = dict.fromkeys(self.paths, 0)
        self.peak_sum = 0
        self.last: dict[str, int] = dict.fromkeys(self.paths, 0)
        self.cpu_first: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}
        self._watch_cpu(first=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _free(self) -> dict[str, int]:
        free = {}
        for label, path in self.paths.items():
            st = os.statvfs(path)
            free[label] = st.f_bavail * st.f_frsize
        return free

    def _allocated(self) -> int:
        total = 0
        for image in self.images:
            try:
                total += image.stat().st_blocks * 512
            except OSError:
                continue
        return total

    def _watch_cpu(self, first: bool = False) -> None:
        pid = self.pid_of()
        if pid is None:
            return
        used = process_cpu(pid)
        if used is None:
            return
        self.cpu_first.setdefault(pid, used if first else 0.0)
        self.cpu_last[pid] = used

    def _take(self) -> None:
        drops = {k: self.baseline[k] - v for k, v in self._free().items()}
        growth = self._allocated() - self.image_baseline
        for label, drop in drops.items():
            self.peak[label] = max(self.peak[label], drop)
        self.image_growth = max(self.image_growth, growth)
        self.peak_sum = max(self.peak_sum, sum(drops.values()) - growth)
        self.last = {**drops, "image growth": -growth}
        self._watch_cpu()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def peak_extra(self) -> int:
        """Peak extra disk in bytes, over all sampled filesystems together."""
        return self.peak_sum

    def extra_at_end(self) -> int:
        """Extra disk still used when sampling stopped."""
        return sum(self.last.values())

    def cpu(self) -> float:
        """CPU seconds the watched process(es) used while sampling."""
        return sum(self.cpu_last[p] - self.cpu_first[p] for p in self.cpu_last)


def process_cpu(pid: int) -> float | None:
    """CPU seconds (user+system, own and reaped children) of process `pid`, None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU seconds of every child this process has waited for."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Measure:
    """One measured step."""

    key: str
    what: str
    seconds: float = 0.0
    added: int | None = None  # bytes added to the repository, or output size
    extra_peak: int = 0  # peak extra disk on the data filesystems while it ran
    extra_end: int = 0
    extra_by_fs: dict[str, int] = field(default_factory=dict)  # peak per filesystem
    cpu_client: float = 0.0  # CPU of our children (borg, tar, incus client, incus-borg)
    cpu_daemon: float = 0.0  # CPU of incusd and its children (gzip/tar during export)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@contextmanager
def measuring(
    measure: Measure,
    sampled: Mapping[str, Path],
    daemon_pid: Callable[[], int | None],
    images: Sequence[Path] = (),
) -> Iterator[Measure]:
    """Time a block and sample free space and CPU while it runs; fills `measure`."""
    cpu0 = children_cpu()
    started = time.monotonic()
    with Sampler(sampled, daemon_pid, images) as sampler:
        yield measure
    measure.seconds = time.monotonic() - started
    measure.extra_peak = sampler.peak_extra()
    measure.extra_end = sampler.extra_at_end()
    measure.extra_by_fs = {**sampler.peak, "btrfs image growth": sampler.image_growth}
    measure.cpu_client = children_cpu() - cpu0
    measure.cpu_daemon = sampler.cpu()


# --- the scratch area --------------------------------------------------------------------


@dataclass
class Scratch:
    """The benchmark's temporary directory tree (see the module docstring)."""

    top: Path
    data: Path
    out: Path
    borg_base: Path
    logs: Path
    image: Path


def check_free_space(base: Path, needed: int) -> None:
    """Refuse to start when `base` has less than `needed` bytes free."""
    st = os.statvfs(base)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise BenchError(
            f"{base} has {free / GB:.1f} GB free; this scale needs about {needed / GB:.1f} GB"
        )


@contextmanager
def scratch(base: Path, data_fs_size: int) -> Iterator[Scratch]:
    """Create the scratch tree with its ext4 data filesystem; remove all of it afterwards."""
    top = Path(tempfile.mkdtemp(prefix="incus-borg-bench-", dir=base))
    top.chmod(0o711)  # container uids traverse it to reach their rootfs
    s = Scratch(
        top=top,
        data=top / "data",
        out=top / "out",
        borg_base=top / "borg-base",
        logs=top / "logs",
        image=top / "data.img",
    )
    try:
        for d in (s.data, s.out, s.borg_base, s.logs):
            d.mkdir(mode=0o711)
        with s.image.open("wb") as f:
            f.truncate(data_fs_size)
        for argv in (
            ["mkfs.ext4", "-q", "-F", "-m", "0", str(s.image)],
            ["mount", "-o", "loop", str(s.image), str(s.data)],
        ):
            res = subprocess.run(argv, capture_output=True, text=True, check=False)
            if res.returncode:
                raise BenchError(f"{shlex.join(argv)} exited {res.returncode}: {res.stderr}")
        s.data.chmod(0o711)
        yield s
    finally:
        with shielded():
            remove_scratch(s)


def remove_scratch(s: Scratch) -> None:
    """Unmount the data filesystem and delete the whole tree."""
    if os.path.ismount(s.data):
        res = subprocess.run(["umount", str(s.data)], capture_output=True, text=True)
        if res.returncode:
            subprocess.run(["umount", "-l", str(s.data)], capture_output=True)
    if os.path.ismount(s.data):
        print(f"bench: could not unmount {s.data}; leaving {s.top}", file=sys.stderr)
        return
    shutil.rmtree(s.top, ignore_errors=True)
    if s.top.exists():
        print(f"bench: could not remove {s.top} entirely", file=sys.stderr)


@contextmanager
def private_server(s: Scratch, btrfs_size: str) -> Iterator[IncusServer]:
    """A prepared private Incus whose root is on the data filesystem; always shut down."""
    daemon = PrivateIncus(root=s.data / "incus-root")
    try:
        daemon.start()
        yield prepare_server(daemon, btrfs_size=btrfs_size)
    finally:
        with shielded():
            print("bench: shutting the private Incus down", file=sys.stderr)
            left = daemon.shutdown()
            for item in left:
                print(f"bench: teardown left {item}", file=sys.stderr)


# --- the data ----------------------------------------------------------------------------


def borg_env(s: Scratch) -> dict[str, str]:
    """Environment for borg and incus-borg: our passphrase, caches inside the scratch tree."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BORG_", "INCUS_BORG"))}
    return {
        **clean,
        "BORG_PASSPHRASE": PASSPHRASE,
        "BORG_EXIT_CODES": "modern",
        "BORG_BASE_DIR": str(s.borg_base),
    }


def borg_binary() -> str:
    """The venv's borg (the one incus-borg runs)."""
    return str(Path(sys.executable).parent / "borg")


def incus_borg_argv(config: Path, *args: str, debug: bool = False) -> list[str]:
    """`incus-borg [--debug] -c CONFIG ARGS...` run with this interpreter (--debug logs each
    borg command line on stderr, which timestamps turn into a timeline)."""
    flags = ["--debug"] if debug else []
    return [sys.executable, "-m", "incus_borg", *flags, "-c", str(config), *args]


def make_config(server: IncusServer, s: Scratch, repo: Path) -> Path:
    """An incus-borg configuration: staging on the data filesystem, repository in `out`."""
    root = server.daemon.root / "bench"
    return incus_config(server, root, repositories=[{"path": str(repo), "label": "local"}])


def rootfs(server: IncusServer, pool: str, name: str) -> Path:
    """The on-disk rootfs of container `name` (default project) on `pool`."""
    return container_dir(server, pool, name) / "rootfs"


def container_dir(server: IncusServer, pool: str, name: str) -> Path:
    """The on-disk directory of container `name` (default project) on `pool`."""
    return Path(server.daemon.incus_dir) / "storage-pools" / pool / "containers" / name


def compressible(size: int) -> bytes:
    """`size` bytes that compress about 4:1 and never repeat (1 KiB random, 3 KiB zeros)."""
    block = 4096
    parts = []
    for _ in range(math.ceil(size / block)):
        parts.append(os.urandom(1024))
        parts.append(bytes(block - 1024))
    return b"".join(parts)[:size]


def write_blob(path: Path, size: int, make: Callable[[int], bytes]) -> None:
    """Write a large file in 8 MiB pieces made by `make`."""
    with path.open("wb") as f:
        left = size
        while left > 0:
            piece = min(left, 8 * MiB)
            f.write(make(piece))
            left -= piece


def fill_container(root: Path, scale: float, seed: int) -> None:
    """Put a /usr-like tree, many unique small files and two large files into a rootfs."""
    rng = random.Random(seed)
    for tree in BASE_TREES:
        if Path(tree).is_dir():
            target = root / tree.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", tree, str(target)], check=True)
    small = root / "srv" / "small"
    for i in range(max(1, round(SMALL_FILES * scale))):
        d = small / f"d{i // 50:03d}"
        if i % 50 == 0:
            d.mkdir(parents=True, exist_ok=True)
        size = int(math.exp(rng.uniform(math.log(100), math.log(50_000))))
        text = rng.random() < 0.5
        content = os.urandom(size // 2 + 1).hex()[:size].encode() if text else os.urandom(size)
        (d / f"f{i:05d}{'.txt' if text else '.bin'}").write_bytes(content)
    big = root / "srv" / "large"
    big.mkdir(parents=True, exist_ok=True)
    size = max(MiB, int(LARGE_MIB * MiB * scale))
    write_blob(big / "random.bin", size, os.urandom)
    write_blob(big / "log.dat", size, compressible)


def regular_files(top: Path) -> Iterator[Path]:
    """Every regular file below `top` (symlinks not followed)."""
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


def tree_size(top: Path) -> tuple[int, int]:
    """(bytes, files) of the regular files below `top`."""
    total = count = 0
    for path in regular_files(top):
        total += path.lstat().st_size
        count += 1
    return total, count


def allocated(top: Path) -> int:
    """Bytes of disk blocks allocated to the regular files below `top`."""
    return sum(p.lstat().st_blocks * 512 for p in regular_files(top))


def change_files(roots: Sequence[Path], fraction: float, seed: int) -> tuple[int, int]:
    """Overwrite 4 KiB (or the whole file, if smaller) at a random offset in `fraction` of
    the non-empty regular files below `roots`; returns (files changed, files considered)."""
    rng = random.Random(seed)
    files = sorted(p for r in roots for p in regular_files(r) if p.lstat().st_size > 0)
    chosen = rng.sample(files, max(1, round(len(files) * fraction)))
    for path in chosen:
        size = path.lstat().st_size
        n = min(4096, size)
        with path.open("r+b") as f:
            f.seek(rng.randrange(0, size - n + 1))
            f.write(os.urandom(n))
    return len(chosen), len(files)


def parse_size(text: str) -> int:
    """'6GiB', '512MiB', '2G' or plain bytes -> bytes."""
    units = {"KiB": 1 << 10, "MiB": MiB, "GiB": GiB, "K": 1000, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


# --- printing ----------------------------------------------------------------------------


def human(n: float | None) -> str:
    """Bytes as MB/GB with 3 significant digits; '-' for None."""
    if n is None:
        return "-"
    if abs(n) >= GB:
        return f"{n / GB:.2f} GB"
    return f"{n / MB:.1f} MB"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """A plain text table; columns in `right` are right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(str(cell).rjust(widths[i]) if i in right else str(cell).ljust(widths[i]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def verdict(ok: bool) -> str:
    """'met' or 'MISSED'."""
    return "met" if ok else "MISSED"


def save_json(path: Path, data: Any) -> None:
    """Write raw results as JSON."""
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def run_bench(
    name: str,
    args: Any,
    free_needed: int,
    data_fs_size: int,
    btrfs_size: str,
    measure: Callable[[IncusServer, Scratch], tuple[str, Any]],
) -> int:
    """A benchmark's common frame: root check, scratch area and private Incus, cleanup on
    every path; `measure` returns the report to print and the raw figures. Returns the exit
    code."""
    if os.geteuid() != 0:
        print(f"bench/{name}: needs root (it runs a private incusd)", file=sys.stderr)
        return 2
    install_signal_handlers()
    args.load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        check_free_space(args.tmp, free_needed)
        with scratch(args.tmp, data_fs_size) as s, private_server(s, btrfs_size) as server:
            report, raw = measure(server, s)
            print(report, flush=True)
            if args.json:
                save_json(args.json, raw)
    except BenchError as exc:
        print(f"bench/{name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bench/{name}: interrupted; cleaned up", file=sys.stderr)
        return 130
    return 0


def log(message: str) -> None:
    """A progress line on stderr, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Re-exported from the harness for the benchmark scripts.
__all__ = ["BTRFS_POOL", "DEFAULT_POOL", "IncusServer"]
