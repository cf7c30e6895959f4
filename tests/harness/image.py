"""A tiny busybox container image, built at test time from the host's busybox-static."""

from __future__ import annotations

import io
import platform
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from .incusd import PrivateIncus

BUSYBOX = Path("/bin/busybox")
ALIAS = "tiny"

# PID 1 of the container: stays up and exits at once on SIGPWR (what `incus stop` sends),
# SIGTERM or SIGINT. `wait` returns as soon as a trapped signal arrives.
INIT_SCRIPT = """#!/bin/busybox sh
trap 'exit 0' PWR TERM INT
while :; do
    sleep 3600 &
    wait $!
done
"""

PASSWD = "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
GROUP = "root:x:0:\nuser:x:1000:\n"


def applets(busybox: Path = BUSYBOX) -> list[str]:
    """Names of the applets the host's busybox provides."""
    out = subprocess.run(
        [str(busybox), "--list"], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    return sorted({line.strip() for line in out.splitlines() if line.strip()})


def _member(
    tar: tarfile.TarFile,
    name: str,
    kind: bytes,
    *,
    mode: int = 0o755,
    uid: int = 0,
    data: bytes = b"",
    target: str = "",
) -> None:
    """Add one member (regular file, directory or symlink) owned by uid:uid."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid = info.gid = uid
    info.mtime = int(time.time())
    info.linkname = target
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _write_tar(path: Path, fill: Callable[[tarfile.TarFile], None]) -> Path:
    """Write a gzip tarball filled by ``fill``."""
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        fill(tar)
    return path


def build_rootfs(dest: Path, busybox: Path = BUSYBOX) -> Path:
    """Write ``dest`` (rootfs.tar.gz): busybox, its applet links, init and a few users."""
    names = [a for a in applets(busybox) if a != "busybox"]

    def fill(tar: tarfile.TarFile) -> None:
        for d in ("bin", "sbin", "etc", "dev", "proc", "sys", "root", "home", "run", "var"):
            _member(tar, d, tarfile.DIRTYPE, mode=0o700 if d == "root" else 0o755)
        _member(tar, "tmp", tarfile.DIRTYPE, mode=0o1777)
        _member(tar, "home/user", tarfile.DIRTYPE, mode=0o755, uid=1000)
        _member(tar, "bin/busybox", tarfile.REGTYPE, data=busybox.read_bytes())
        for name in names:
            _member(tar, f"bin/{name}", tarfile.SYMTYPE, mode=0o777, target="busybox")
        _member(tar, "sbin/init", tarfile.REGTYPE, data=INIT_SCRIPT.encode())
        _member(tar, "etc/passwd", tarfile.REGTYPE, mode=0o644, data=PASSWD.encode())
        _member(tar, "etc/group", tarfile.REGTYPE, mode=0o644, data=GROUP.encode())
        _member(tar, "etc/hostname", tarfile.REGTYPE, mode=0o644, data=b"tiny\n")

    return _write_tar(dest, fill)


def build_metadata(dest: Path) -> Path:
    """Write ``dest`` (meta.tar.gz) holding metadata.yaml for the host's architecture."""
    meta = {
        "architecture": platform.machine(),
        "creation_date": int(time.time()),
        "properties": {
            "os": "busybox",
            "release": "tiny",
            "description": "busybox test image",
            "architecture": platform.machine(),
        },
        "templates": {},
    }
    data = yaml.safe_dump(meta, sort_keys=False).encode()

    def fill(tar: tarfile.TarFile) -> None:
        _member(tar, "metadata.yaml", tarfile.REGTYPE, mode=0o644, data=data)
        _member(tar, "templates", tarfile.DIRTYPE)

    return _write_tar(dest, fill)


def build_image(workdir: Path, busybox: Path = BUSYBOX) -> tuple[Path, Path]:
    """Build both tarballs in ``workdir``; return (metadata, rootfs)."""
    workdir.mkdir(parents=True, exist_ok=True)
    return build_metadata(workdir / "meta.tar.gz"), build_rootfs(workdir / "rootfs.tar.gz", busybox)


def import_image(daemon: PrivateIncus, workdir: Path, alias: str = ALIAS) -> str:
    """Build the image in ``workdir`` and import it as ``alias``; return its fingerprint."""
    meta, rootfs = build_image(workdir)
    daemon.incus("image", "import", str(meta), str(rootfs), "--alias", alias)
    image: dict[str, str] = daemon.query(f"/1.0/images/aliases/{alias}")
    return image["target"]
