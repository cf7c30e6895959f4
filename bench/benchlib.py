"""The benchmarks' shared frame: command line, a scratch area holding a private Incus, timed
commands, a free-space and CPU sampler, container filling and table printing.

Not part of the test suite. Everything lives below one temporary directory (default under
/tmp) and is removed on exit, including on failure, Ctrl-C, SIGTERM or SIGHUP:

    <top>/data.img, <top>/data/   an ext4 loop filesystem holding only the Incus side
                                  (the private daemon's root, staging), so that its free
                                  space shows the extra disk a method needs
    <top>/out/                    repositories, tarballs and exports (on the host's disk)
    <top>/borg-base/              BORG_BASE_DIR: borg's caches and security dir
    <top>/logs/                   stdout and stderr of every command

A benchmark subclasses `Bench` (its options, sizes, `build`, `run`, `report`, `raw`) and
calls `main(TheBench)`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the private-incusd harness and cli helpers

from cli import borg_env as test_borg_env  # noqa: E402
from cli import incus_config  # noqa: E402
from harness.incusd import PrivateIncus  # noqa: E402
from harness.server import BTRFS_POOL, DEFAULT_POOL, IncusServer, prepare_server  # noqa: E402

from incus_borg import layout  # noqa: E402
from incus_borg.borg import find_borg  # noqa: E402
from incus_borg.host import signals  # noqa: E402

T = TypeVar("T")
R = TypeVar("R")

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
POOLS = {"dir": DEFAULT_POOL, "btrfs": BTRFS_POOL}  # pool kind -> the harness's pool
# Many small containers: the same few hundred small files in every one (about 300 files,
# 3.5 MB), and unique data in files of 256 KiB.
SHARED_TREES = ("/usr/lib/python3.11/encodings", "/usr/lib/python3.11/email")
UNIQUE_FILE = 256 << 10

# The plain-borg floor reads the Incus directory like incus-borg's server archive does, but
# with the pools' data in place: the btrfs loop image is excluded (its mount is read), and so
# are the transient files incus-borg also leaves out.
FLOOR_EXCLUDES = tuple(
    f"sh:incus/{p}" for p in layout.INCUS_EXCLUDES if p not in ("database", "storage-pools/*/*/*")
)


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which command and why."""


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
        stamp: bool = False,
        discard: bool = False,
    ) -> Done:
        """Run `argv` to completion and time it; raise BenchError on an exit code not in `ok`.

        With `stamp`, every stderr line is prefixed with the seconds since the start; with
        `discard`, stdout goes to /dev/null. The child gets its own process group, so that
        the terminal's Ctrl-C reaches the benchmark only, which then stops the child.
        """
        self.count += 1
        stem = self.logs / f"{self.count:03d}-{Path(argv[0]).name}"
        out_path, err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
        with out_path.open("wb") as out, err_path.open("wb") as err:
            started = time.monotonic()
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if discard else out,
                stderr=subprocess.PIPE if stamp else err,
                env={**self.env, **(env or {})},
                cwd=cwd,
                process_group=0,
            )
            code = wait_child(proc, err if stamp else None, started)
            seconds = time.monotonic() - started
        stdout, stderr = (p.read_text(errors="replace") for p in (out_path, err_path))
        done = Done(list(argv), code, seconds, stdout, stderr)
        if code not in ok:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise BenchError(f"{shlex.join(done.argv)} exited {code}:\n{tail}")
        return done


def wait_child(proc: subprocess.Popen[bytes], stamped: IO[bytes] | None, started: float) -> int:
    """Wait for `proc` (copying its stderr into `stamped`, if given, with timestamps) for up
    to an hour; stop it when the wait is interrupted or times out."""
    copier = None
    if stamped is not None:
        copier = threading.Thread(target=_stamp, args=(proc, stamped, started), daemon=True)
        copier.start()
    try:
        return proc.wait(3600)
    except BaseException:
        stop_child(proc)
        raise
    finally:
        if copier is not None:
            copier.join(10)


def _stamp(proc: subprocess.Popen[bytes], err: IO[bytes], started: float) -> None:
    """Copy `proc`'s stderr to `err`, each line prefixed with the seconds since `started`."""
    assert proc.stderr is not None
    for line in proc.stderr:
        err.write(f"{time.monotonic() - started:9.3f} ".encode() + line)
    err.flush()


def stop_child(proc: subprocess.Popen[bytes]) -> None:
    """End an interrupted (or timed-out) command: SIGTERM to it alone, as `kill` sends it
    (incus-borg then stops its borg and undoes its quiesce); after 300 s, SIGKILL to its
    whole process group."""
    with signals.shielded():
        proc.terminate()
        try:
            proc.wait(300)
        except subprocess.TimeoutExpired:
            print(f"bench: {proc.args!r} did not stop: killing it", file=sys.stderr)
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def parallel(work: Callable[[T], R], items: Iterable[T], jobs: int) -> list[R]:
    """`work` on each of `items`, `jobs` at a time; an interrupt cancels what has not begun."""
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        return list(pool.map(work, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- measuring ---------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Samples, every 0.1 s, the free space of some filesystems and the CPU time
    of a process that may be replaced while it runs (incusd is restarted by incus-borg:
    `pid_of` returns the current pid).

    `peak_sum` is the largest drop of free space, summed over the filesystems at one sample,
    relative to the first sample, minus the growth of the allocated size of the `images` at
    that sample: a loop image on one sampled filesystem holding another sampled filesystem
    (the btrfs pool) would otherwise count twice, and btrfs, committing every 30 s, also grows
    its sparse image into fresh blocks without using more space inside. `last` holds the
    same per filesystem at the last sample. `cpu()` sums, over every pid seen, its CPU time
    at the last sample minus at the first.
    """

    def __init__(
        self, paths: Mapping[str, Path], pid_of: Callable[[], int | None], images: Sequence[Path]
    ) -> None:
        super().__init__(daemon=True)
        self.paths, self.pid_of, self.images = dict(paths), pid_of, list(images)
        self.baseline, self.image_baseline = self._free(), self._allocated()
        self.peak = dict.fromkeys(self.paths, 0)
        self.peak_sum = self.image_growth = 0
        self.last: dict[str, int] = {}
        self.cpu_first: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}
        self._watch_cpu(first=True)
        self.stopping = threading.Event()

    def _free(self) -> dict[str, int]:
        return {label: free_bytes(path) for label, path in self.paths.items()}

    def _allocated(self) -> int:
        return sum(image.stat().st_blocks * 512 for image in self.images if image.exists())

    def _watch_cpu(self, first: bool = False) -> None:
        pid = self.pid_of()
        used = None if pid is None else process_cpu(pid)
        if pid is not None and used is not None:
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

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            self._take()

    def stop(self) -> None:
        """End sampling with a last sample."""
        self.stopping.set()
        self.join()
        self._take()

    def cpu(self) -> float:
        """CPU seconds the watched process(es) used while sampling."""
        return sum(self.cpu_last[p] - self.cpu_first[p] for p in self.cpu_last)


def free_bytes(path: Path) -> int:
    """Bytes free for unprivileged use on the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


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
    m: Measure,
    sampled: Mapping[str, Path],
    pid_of: Callable[[], int | None],
    images: Sequence[Path],
) -> Iterator[Measure]:
    """Time a block and sample free space and CPU while it runs; fills `m`."""
    cpu0, started = children_cpu(), time.monotonic()
    sampler = Sampler(sampled, pid_of, images)
    sampler.start()
    try:
        yield m
    finally:
        sampler.stop()
    m.seconds = time.monotonic() - started
    m.extra_peak, m.extra_end = sampler.peak_sum, sum(sampler.last.values())
    m.extra_by_fs = {**sampler.peak, "btrfs image growth": sampler.image_growth}
    m.cpu_client, m.cpu_daemon = children_cpu() - cpu0, sampler.cpu()


# --- the scratch area and the server -----------------------------------------------------


@dataclass
class Scratch:
    """The benchmark's temporary directory tree (see the module docstring)."""

    top: Path
    data: Path = field(init=False)
    out: Path = field(init=False)
    borg_base: Path = field(init=False)
    logs: Path = field(init=False)
    image: Path = field(init=False)

    def __post_init__(self) -> None:
        self.data, self.out, self.borg_base, self.logs, self.image = (
            self.top / n for n in ("data", "out", "borg-base", "logs", "data.img")
        )


@dataclass
class Sizes:
    """What a benchmark needs of the disk."""

    free: int  # bytes free under --tmp before it starts
    data_fs: int  # apparent size of the sparse data filesystem
    btrfs: str  # the btrfs loop pool's size, as Incus takes it


@contextmanager
def scratch(base: Path, data_fs_size: int) -> Iterator[Scratch]:
    """Create the scratch tree with its ext4 data filesystem; remove all of it afterwards."""
    s = Scratch(Path(tempfile.mkdtemp(prefix="incus-borg-bench-", dir=base)))
    s.top.chmod(0o711)  # container uids traverse it to reach their rootfs
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
        with signals.shielded():
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
        with signals.shielded():
            print("bench: shutting the private Incus down", file=sys.stderr)
            for item in daemon.shutdown():
                print(f"bench: teardown left {item}", file=sys.stderr)


# Borg's success and warning exits (modern exit codes: 100-127 are warnings, such as a file
# of the live Incus directory changing while a plain `borg create` reads it).
BORG_OK = (0, 1, *range(100, 128))


def borg_env(s: Scratch) -> dict[str, str]:
    """Environment for borg and incus-borg: the tests' passphrase, caches in the scratch tree."""
    return {**test_borg_env(), "BORG_BASE_DIR": str(s.borg_base)}


def incus_borg_argv(config: Path, *args: str, debug: bool = False) -> list[str]:
    """`incus-borg [--debug] -c CONFIG ARGS...` run with this interpreter (--debug logs each
    borg command line on stderr, which timestamps turn into a timeline)."""
    flags = ["--debug"] if debug else []
    return [sys.executable, "-m", "incus_borg", *flags, "-c", str(config), *args]


def run_archives(listing: str, run: str) -> list[str]:
    """The archives of `run` in a `borg list --json` output: the run's own archive and its
    parts (`<run>@...`)."""
    names = [a["name"] for a in json.loads(listing)["archives"]]
    return [n for n in names if n == run or n.startswith(run + layout.PART_MARK)]


def instance_windows(summary: Mapping[str, Any]) -> dict[str, tuple[str, float]]:
    """Instance name -> (quiesce mode, window in seconds), from a `backup --json` summary."""
    return {
        item["ref"].split("/")[-1]: (item["mode"], float(item["window"]))
        for item in summary["items"]
        if item["kind"] == "instance"
    }


# --- the data ----------------------------------------------------------------------------


def container_dir(server: IncusServer, pool: str, name: str) -> Path:
    """The on-disk directory of container `name` (default project) on `pool`."""
    return layout.instance_data(Path(server.daemon.incus_dir), pool, "default", name)


def rootfs(server: IncusServer, pool: str, name: str) -> Path:
    """The on-disk rootfs of container `name` (default project) on `pool`."""
    return container_dir(server, pool, name) / "rootfs"


def compressible(size: int) -> bytes:
    """`size` bytes that compress about 4:1 and never repeat (1 KiB random, 3 KiB zeros)."""
    return b"".join(os.urandom(1024) + bytes(3072) for _ in range(math.ceil(size / 4096)))[:size]


def write_blob(path: Path, size: int, make: Callable[[int], bytes]) -> None:
    """Write a large file in 8 MiB pieces made by `make`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        left = size
        while left > 0:
            piece = min(left, 8 * MiB)
            f.write(make(piece))
            left -= piece


def copy_trees(root: Path, trees: Sequence[str]) -> None:
    """Copy the host's `trees` (those that exist) to the same places below `root`."""
    for tree in trees:
        if Path(tree).is_dir():
            target = root / tree.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", tree, str(target)], check=True)


def write_small_files(top: Path, count: int, rng: random.Random) -> None:
    """`count` unique files of 100 B to 50 kB (log-uniform), half text, 50 per directory."""
    for i in range(count):
        d = top / f"d{i // 50:03d}"
        if i % 50 == 0:
            d.mkdir(parents=True, exist_ok=True)
        size = int(math.exp(rng.uniform(math.log(100), math.log(50_000))))
        text = rng.random() < 0.5
        content = os.urandom(size // 2 + 1).hex()[:size].encode() if text else os.urandom(size)
        (d / f"f{i:05d}{'.txt' if text else '.bin'}").write_bytes(content)


def fill_container(root: Path, scale: float, seed: int) -> None:
    """Put a /usr-like tree, many unique small files and two large files into a rootfs."""
    copy_trees(root, BASE_TREES)
    write_small_files(
        root / "srv" / "small", max(1, round(SMALL_FILES * scale)), random.Random(seed)
    )
    size = max(MiB, int(LARGE_MIB * MiB * scale))
    write_blob(root / "srv" / "large" / "random.bin", size, os.urandom)
    write_blob(root / "srv" / "large" / "log.dat", size, compressible)


def fill_small(root: Path, unique_mb: float) -> None:
    """A small container's data: the shared trees and `unique_mb` MiB of random files."""
    copy_trees(root, SHARED_TREES)
    for i in range(max(1, round(unique_mb * MiB / UNIQUE_FILE))):
        write_blob(root / "srv" / "unique" / f"u{i:04d}.bin", UNIQUE_FILE, os.urandom)


def container_estimate(scale: float) -> float:
    """Rough bytes of one container filled by `fill_container` at `scale`."""
    base = sum(tree_size(Path(t))[0] for t in BASE_TREES if Path(t).is_dir())
    return base + SMALL_FILES * scale * 8000 + 2 * LARGE_MIB * MiB * scale


def regular_files(top: Path) -> Iterator[Path]:
    """Every regular file below `top` (symlinks not followed)."""
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


def tree_size(top: Path) -> tuple[int, int]:
    """(bytes, files) of the regular files below `top`."""
    sizes = [path.lstat().st_size for path in regular_files(top)]
    return sum(sizes), len(sizes)


def allocated(top: Path) -> int:
    """Bytes of disk blocks allocated to the regular files below `top`."""
    return sum(p.lstat().st_blocks * 512 for p in regular_files(top))


def change_files(roots: Sequence[Path], fraction: float, seed: int) -> tuple[int, int]:
    """Overwrite 4 KiB (or the whole file, if smaller) at a random offset in `fraction` of
    the non-empty regular files below `roots` that are not executable (the running
    containers' programs stay intact); returns (files changed, files considered)."""
    rng = random.Random(seed)
    files = sorted(p for r in roots for p in regular_files(r) if _changeable(p))
    chosen = rng.sample(files, max(1, round(len(files) * fraction)))
    for path in chosen:
        size = path.lstat().st_size
        n = min(4096, size)
        with path.open("r+b") as f:
            f.seek(rng.randrange(0, size - n + 1))
            f.write(os.urandom(n))
    os.sync()
    return len(chosen), len(files)


def _changeable(path: Path) -> bool:
    st = path.lstat()
    return st.st_size > 0 and not st.st_mode & 0o111


# --- printing ----------------------------------------------------------------------------

# A cell that is a number, a size, a share or a duration, or '-': right-aligned.
_NUMERIC = re.compile(r"-|-?[\d.]+( ?(MB|GB|%|s))?")


def human(n: float | None) -> str:
    """Bytes as MB/GB with 3 significant digits; '-' for None."""
    if n is None:
        return "-"
    if abs(n) >= GB:
        return f"{n / GB:.2f} GB"
    return f"{n / MB:.1f} MB"


def secs(x: float | None, digits: int = 1) -> str:
    """Seconds with `digits` decimals; '-' for None."""
    return "-" if x is None else f"{x:.{digits}f}"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain text table; columns whose every cell is numeric are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    cols = list(zip(headers, *cells, strict=True))
    widths = [max(len(c) for c in col) for col in cols]
    right = [bool(cells) and all(_NUMERIC.fullmatch(c) for c in col[1:]) for col in cols]

    def line(row: Sequence[str]) -> str:
        out = (c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=True))
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, cells)])


Column = tuple[str, Callable[[Any], object]]


def columns(spec: Sequence[Column], items: Iterable[Any]) -> str:
    """A table with one row per item: each column a header and how to get its cell."""
    return table([h for h, _ in spec], [[get(item) for _, get in spec] for item in items])


def targets(rows: Iterable[tuple[str, str, bool]]) -> str:
    """The targets table: (target, figure, met) rows."""
    return table(["target", "figure", ""], [(t, f, "met" if ok else "MISSED") for t, f, ok in rows])


def log(message: str) -> None:
    """A progress line on stderr, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the frame ---------------------------------------------------------------------------


def positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    """An argparse type: `kind` of the text, which must be > 0."""

    def convert(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def pool_kinds(text: str) -> list[str]:
    """An argparse type: comma-separated pool kinds, of dir and btrfs."""
    kinds = [k for k in text.split(",") if k]
    if not kinds or set(kinds) - set(POOLS):
        raise argparse.ArgumentTypeError("takes dir and/or btrfs, comma-separated")
    return kinds


def parse_size(text: str) -> int:
    """'6GiB', '512MiB', '2G' or plain bytes -> bytes."""
    units = {"KiB": 1 << 10, "MiB": MiB, "GiB": GiB, "K": 1000, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


# A command-line option: flag, type, default, help.
Option = tuple[str, Callable[[str], Any], Any, str]
SCALE: Option = ("--scale", positive(float), 1.0, "multiply each container's unique files")


class Bench:
    """One benchmark against one prepared private server: `build` its content, `run` the
    measurements, then `report` (printed) and `raw` (written by --json)."""

    name: ClassVar[str]
    description: ClassVar[str]
    epilog: ClassVar[str | None] = None
    options: ClassVar[Sequence[Option]] = ()

    def __init__(self, server: IncusServer, s: Scratch, args: argparse.Namespace) -> None:
        self.server = server
        self.s = s
        self.args = args
        self.daemon = server.daemon
        self.incus_dir = Path(self.daemon.incus_dir)
        self.runner = Runner(s.logs, borg_env(s))
        self.sampled = {
            "data fs": s.data,
            "btrfs pool": layout.pool_dir(self.incus_dir, BTRFS_POOL),
        }
        self.measures: dict[str, Measure] = {}

    @classmethod
    def sizes(cls, args: argparse.Namespace) -> Sizes:
        """Disk needs for these arguments."""
        raise NotImplementedError

    def build(self) -> None:
        """Fill the server."""

    def run(self) -> None:
        """Take the measurements."""

    def sections(self) -> list[str]:
        """The report's parts before the targets: a headline and tables."""
        raise NotImplementedError

    def target_rows(self) -> Iterable[tuple[str, str, bool]]:
        """The targets: (target, figure, met)."""
        return ()

    def report(self) -> str:
        """The printed report: the sections, then the targets."""
        return "\n\n".join([*self.sections(), "targets:\n" + targets(self.target_rows())])

    def raw(self) -> dict[str, Any]:
        """Everything measured, for --json."""
        return {
            "args": {k: str(v) for k, v in vars(self.args).items()},
            "measures": {k: asdict(v) for k, v in self.measures.items()},
        }

    # -- helpers for the benchmarks --

    def headline(self, title: str, *more: str) -> str:
        """The report's first line (what ran, on which machine, under which load) and `more`."""
        cores = os.cpu_count()
        return "\n".join(
            [f"{title}; machine: {cores} cores, load before start {self.args.load}", *more]
        )

    def step(self, key: str, what: str) -> AbstractContextManager[Measure]:
        """Context manager measuring step `key` (time, CPU, extra disk), kept in `measures`."""
        log(f"{key}: {what}")
        m = self.measures[key] = Measure(key, what)
        image = self.incus_dir / "disks" / f"{BTRFS_POOL}.img"
        return measuring(m, self.sampled, lambda: self.daemon.pid, [image])

    def launch(
        self, names: Mapping[str, str], fill: Callable[[int, Path], None], jobs: int = 1
    ) -> None:
        """Launch containers (name -> pool) and `fill(n, rootfs)` each, `jobs` at a time."""

        def one(item: tuple[int, tuple[str, str]]) -> None:
            n, (name, pool) = item
            log(f"launching and filling {name} on {pool}")
            self.server.launch(name, pool=pool)
            fill(n, rootfs(self.server, pool, name))

        parallel(one, enumerate(names.items()), jobs)
        os.sync()

    def borg(self, *args: str, ok: Sequence[int] = BORG_OK) -> Done:
        """Run incus-borg's borg with cwd = the daemon's root; returns the finished command."""
        return self.runner.run([find_borg(), *args], cwd=self.daemon.root, ok=ok)

    def borg_init(self, repo: Path) -> None:
        """A fresh repository, encrypted like incus-borg's (repokey-blake2)."""
        self.borg("init", "--encryption", "repokey-blake2", str(repo), ok=(0,))

    def borg_create(self, key: str, what: str, repo: Path, paths: Sequence[str]) -> Measure:
        """Plain `borg create` of `paths` (below the daemon's root, the loop image and
        transients excluded) into archive `key` of `repo`."""
        excludes = [a for p in FLOOR_EXCLUDES for a in ("--exclude", p)]
        with self.step(key, what) as m:
            done = self.borg(
                "create", "--json", "--numeric-ids", *excludes, f"{repo}::{key}", *paths
            )
        stats = json.loads(done.stdout)["archive"]["stats"]
        m.added = stats["deduplicated_size"]
        m.data["stats"] = stats
        m.notes.append(f"read {human(stats['original_size'])}, {stats['nfiles']} files")
        if done.returncode:
            m.notes.append(f"borg exit {done.returncode} (warnings)")
        return m

    def plain_paths(self, names: Mapping[str, str]) -> list[str]:
        """What plain borg reads for a set of containers (name -> pool): the Incus directory
        but its pools, and the containers' directories (relative to the daemon's root)."""
        server = [f"incus/{e}" for e in sorted(os.listdir(self.incus_dir)) if e != "storage-pools"]
        root = self.daemon.root
        dirs = [container_dir(self.server, p, n).relative_to(root) for n, p in names.items()]
        return server + [str(d) for d in dirs]

    def read_alone(self, pool: str, name: str) -> tuple[float, float]:
        """Seconds of plain `borg create` of one container's directory alone into a fresh
        repository, then again unchanged."""
        repo = self.s.out / f"repo-alone-{name}"
        self.borg_init(repo)
        path = str(container_dir(self.server, pool, name))
        first, second = (self.borg("create", "--numeric-ids", f"{repo}::{a}", path) for a in "12")
        shutil.rmtree(repo)
        log(f"borg alone on {name}: {first.seconds:.2f} s, again {second.seconds:.2f} s")
        return first.seconds, second.seconds

    def config(self, label: str, repos: list[dict[str, Any]] | None = None, **extra: Any) -> Path:
        """An initialised incus-borg configuration with its own staging directory (on the data
        filesystem) and repository (default `out/repo-LABEL`)."""
        repos = repos or [{"path": str(self.s.out / f"repo-{label}"), "label": "local"}]
        root = self.daemon.root / "bench" / label
        path = incus_config(self.server, root, repositories=repos, **extra)
        self.runner.run(incus_borg_argv(path, "init"))
        return path

    def backup(
        self, key: str, what: str, config: Path, *args: str
    ) -> tuple[Measure, dict[str, Any], Done]:
        """One measured `incus-borg --debug backup --json`: its measure (bytes added), its
        summary and the command (stderr timestamped)."""
        argv = incus_borg_argv(config, "backup", "--json", *args, debug=True)
        with self.step(key, what) as m:
            done = self.runner.run(argv, ok=(0, 1), stamp=True)
        summary = json.loads(done.stdout)
        m.added = sum(summary["deduplicated_bytes_added"].values())
        m.data["summary"] = summary
        return m, summary, done

    def restore(
        self, key: str, config: Path, run: str, name: str, new: str
    ) -> tuple[Measure, Done]:
        """One measured `incus-borg --debug restore instance RUN NAME --as NEW`."""
        argv = incus_borg_argv(config, "restore", "instance", run, name, "--as", new, debug=True)
        with self.step(key, f"restore {name} as {new} from {run}") as m:
            done = self.runner.run(argv, env=self.daemon.env, stamp=True)
        return m, done

    def delete(self, name: str) -> None:
        """Delete instance `name` (a restored copy) and flush."""
        self.daemon.incus("delete", "--force", name, timeout=600)
        os.sync()


class PerPoolBench(Bench):
    """One container per pool (`dir`, btrfs), each holding `--size-mb` MiB that `fill` writes."""

    prefix: ClassVar[str]  # the containers' names: PREFIX-dir, PREFIX-btrfs
    copies: ClassVar[int] = 2  # how many times the data the scratch filesystems must hold

    @classmethod
    def sizes(cls, args: argparse.Namespace) -> Sizes:
        data = args.size_mb * MiB * len(POOLS)
        btrfs = f"{max(2, math.ceil(cls.copies * data / GiB))}GiB"
        return Sizes((cls.copies + 1) * data + 2 * GiB, cls.copies * data + 6 * GiB, btrfs)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.names = {f"{self.prefix}-{kind}": pool for kind, pool in POOLS.items()}
        self.data = self.args.size_mb * MiB * len(self.names)

    def fill(self, root: Path) -> None:
        """Write one container's data below its rootfs."""
        raise NotImplementedError

    def build(self) -> None:
        """One container per pool, filled."""
        self.launch(self.names, lambda n, root: self.fill(root))

    def raw(self) -> dict[str, Any]:
        """Everything measured, for --json."""
        return {**super().raw(), "data": self.data}


def parse_args(bench: type[Bench], argv: Sequence[str] | None) -> argparse.Namespace:
    """The benchmark's options plus the common --tmp and --json."""
    parser = argparse.ArgumentParser(description=bench.description, epilog=bench.epilog)
    for flag, kind, default, text in bench.options:
        more = "" if default is None else f" (default {default})"
        parser.add_argument(flag, type=kind, default=default, help=text + more)
    parser.add_argument(
        "--tmp", type=Path, default=Path("/tmp"), help="where the scratch tree goes (/tmp)"
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures to this file")
    args = parser.parse_args(argv)
    args.load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return args


def measure(bench: type[Bench], args: argparse.Namespace) -> None:
    """Scratch area, private server, the benchmark itself, its report; cleanup on every path."""
    sizes = bench.sizes(args)
    if free_bytes(args.tmp) < sizes.free:
        free, needed = free_bytes(args.tmp) / GB, sizes.free / GB
        raise BenchError(f"{args.tmp} has {free:.1f} GB free; this needs about {needed:.1f} GB")
    with scratch(args.tmp, sizes.data_fs) as s, private_server(s, sizes.btrfs) as server:
        b = bench(server, s, args)
        b.build()
        b.run()
        print(b.report(), flush=True)
        if args.json:
            args.json.write_text(json.dumps(b.raw(), indent=2, default=str) + "\n")


def main(bench: type[Bench], argv: Sequence[str] | None = None) -> int:
    """A benchmark's entry point; returns the exit code. SIGTERM and SIGHUP interrupt it like
    Ctrl-C, so that the running command is stopped and everything is cleaned up."""
    args = parse_args(bench, argv)
    if os.geteuid() != 0:
        print(f"bench/{bench.name}: needs root (it runs a private incusd)", file=sys.stderr)
        return 2
    with signals.interruptible():
        try:
            measure(bench, args)
        except BenchError as exc:
            print(f"bench/{bench.name}: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"bench/{bench.name}: interrupted; cleaned up", file=sys.stderr)
            return 130
    return 0
