"""Reading inside an exported item: its data is the tar stream Incus's backup gave (members
`backup/index.yaml`, `backup/container/...`, `backup/volume...`), stored as one file.

A member is read by streaming the tar until it comes (the index is the first member, so it
costs little); files are extracted with GNU tar, which keeps what Incus put in the stream:
numeric owners, modes, hard links, extended attributes and ACLs.
"""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from ..errors import UserError
from ..manifest import Item

INDEX = "backup/index.yaml"  # Incus writes it first, with the instance's or volume's config
NOT_FOUND = "Not found in archive"  # GNU tar, for a named member the stream does not hold


def member_name(item: Item, path: str) -> str:
    """The tar member of an exported item that an archive path of its subtree names."""
    return path.removeprefix(f"{item.path}/")


def read_member(stream: IO[bytes], name: str) -> bytes | None:
    """The content of one member of a tar stream (read up to it), None when it has none."""
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if member.name.removeprefix("./") == name:
                data = tar.extractfile(member)
                return data.read() if data is not None else None
    return None


TYPE_BITS = {
    tarfile.REGTYPE: stat.S_IFREG,
    tarfile.AREGTYPE: stat.S_IFREG,
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


def listing(item: Item, stream: IO[bytes]) -> str:
    """An exported item's files as `borg list --json-lines` gives an item read in place
    (path below the item's archive path, mode, owner, size, sha256; a hard link as type `h`
    naming its source), so that a restore is compared with it the same way."""
    lines = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            path = f"{item.path}/{member.name.removeprefix('./').rstrip('/')}"
            entry: dict[str, object] = {"path": path, "uid": member.uid, "gid": member.gid}
            entry["size"] = member.size
            if member.islnk():
                entry["mode"] = "h" + stat.filemode(stat.S_IFREG | member.mode)[1:]
                entry["source"] = f"{item.path}/{member.linkname.removeprefix('./')}"
            else:
                entry["mode"] = stat.filemode(TYPE_BITS.get(member.type, 0) | member.mode)
            data = tar.extractfile(member) if member.isreg() else None
            if data is not None:
                digest = hashlib.sha256()
                while chunk := data.read(1 << 20):
                    digest.update(chunk)
                entry["sha256"] = digest.hexdigest()
            lines.append(json.dumps(entry))
    while stream.read(1 << 20):  # the tar's end blocks: the writer then ends without a broken pipe
        pass
    return "\n".join(lines)


def untar(stream: IO[bytes], names: Sequence[str], strip: int, dest: Path) -> None:
    """Extract the named members of a tar stream (directories with what is below them) into
    `dest`, dropping `strip` leading parts of each name; a name the stream lacks is left
    out (the caller sees what came)."""
    argv = ["tar", "-x", "-C", str(dest), "--numeric-owner", "--same-permissions"]
    argv += ["--xattrs", "--xattrs-include=*", "--acls", f"--strip-components={strip}"]
    done = subprocess.run(
        [*argv, "-f", "-", "--", *names], stdin=stream, capture_output=True, check=False
    )
    errors = [
        line
        for line in done.stderr.decode("utf-8", "replace").splitlines()
        if line.strip() and NOT_FOUND not in line and "previous errors" not in line
    ]
    if done.returncode != 0 and errors:
        raise UserError(f"unpacking {', '.join(names)} failed: {errors[-1]}")
