"""Extracting archived trees into existing directories, cut into parallel extractions.

One `borg extract` is single-threaded and CPU-bound, so a large tree is cut into disjoint
subtrees ("cuts") that are extracted side by side with the rest. The cuts come from the
archive's listing, chosen so that the extractions never get in each other's way:

- A cut's directory and the directories above it are made before any extraction starts,
  each holding a placeholder file, so that no extraction ever finds one empty and removes
  it (borg removes an existing empty directory before recreating it), and no extraction
  creates an entry in a directory that the other one owns.
- A hard link and the file it links to stay within one extraction.
- No cut is taken inside a directory carrying file flags (such as immutable).
- Afterwards the placeholders go, and each of those directories keeps the mtime that its
  extraction gave it.
"""

from __future__ import annotations

import heapq
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import UserError

ITEM_COST = 50_000  # what extracting one item costs beyond its data, in bytes' worth
MIN_CUT = 64_000_000  # a cut smaller than this is not worth starting another borg
MAX_CUT_PATHS = 64  # subtrees in one cut (they all go on the command line)
PLACEHOLDER = ".incus-borg-extracting"
TYPES: dict[str, Callable[[int], bool]] = {"d": stat.S_ISDIR, "-": stat.S_ISREG, "l": stat.S_ISLNK}


@dataclass(frozen=True)
class Entry:
    """One archived item, as listed."""

    path: str
    type: str  # first letter of `ls -l`: d, -, l, c, b, p, s
    size: int
    source: str = ""  # a hard link's first path (or a symlink's target)
    flags: int = 0

    @property
    def hard_link(self) -> bool:
        """Whether this is a hard link to an earlier item."""
        return self.type == "-" and bool(self.source)


def parse_listing(text: str) -> list[Entry]:
    """Entries from `borg list --format "{type} {size} {flags}{NUL}{source}{NUL}{path}{NUL}"`."""
    fields = text.split("\0")
    entries = []
    for i in range(0, len(fields) - 2, 3):
        kind, size, flags = fields[i].split(" ")
        entries.append(Entry(fields[i + 2], kind, int(size or 0), fields[i + 1], int(flags or 0)))
    return entries


def walk_listing(root: Path, top: str) -> list[Entry]:
    """Entries of a directory tree on disk, named as in an archive (`top` below `root`)."""
    entries = []
    first_of_inode: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root / top):
        for name in sorted(dirnames) + sorted(filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            source = ""
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                source = first_of_inode.setdefault((st.st_dev, st.st_ino), rel)
                source = "" if source == rel else source
            kind = stat.filemode(st.st_mode)[0]
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            entries.append(Entry(rel, kind, size, source))
    return entries


@dataclass(frozen=True)
class Tree:
    """One archived directory whose content goes into an existing directory (its own
    directory item is not extracted: the target keeps its owner and mode)."""

    path: str
    dest: Path

    @property
    def strip(self) -> int:
        """Leading path parts to drop so that the tree's children land in `dest`."""
        return len(PurePosixPath(self.path).parts)


@dataclass(frozen=True)
class Job:
    """One extraction: `paths` less `excludes`, into `dest`, dropping `strip` parts."""

    paths: tuple[str, ...]
    excludes: tuple[str, ...]
    strip: int
    dest: Path
    cost: int


@dataclass
class Extractions:
    """The extractions of some trees, and what has to happen around them."""

    jobs: list[Job]
    placeholders: list[Path] = field(default_factory=list)  # files in directories made first

    def prepare(self) -> None:
        """Make the cuts' directories and those above them, each holding a placeholder."""
        for placeholder in self.placeholders:
            placeholder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            placeholder.touch(mode=0o600)

    def finish(self) -> None:
        """Remove the placeholders, keeping their directories' times as extracted."""
        for placeholder in self.placeholders:
            st = placeholder.parent.lstat()
            placeholder.unlink(missing_ok=True)
            os.utime(placeholder.parent, ns=(st.st_atime_ns, st.st_mtime_ns))


class _Node:
    """A directory of a tree, with the cost of everything below it."""

    def __init__(self, path: str, parent: _Node | None, flags: int) -> None:
        self.path = path
        self.parent = parent
        self.flags = flags
        self.cost = 0
        self.children: list[_Node] = []
        # Holds one end of a hard link whose other end is outside, or has a name borg could
        # not print (it shows undecodable bytes as "?"), which cannot be named back to it.
        self.blocked = "?" in path


def _cost(entry: Entry) -> int:
    return ITEM_COST + (entry.size if entry.type == "-" and not entry.hard_link else 0)


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _build(tree: Tree, entries: Sequence[Entry]) -> _Node:
    """The root of one tree's directory nodes, with subtree costs and hard-link blocks."""
    root = _Node(tree.path, None, 0)
    nodes = {tree.path: root}
    below = [e for e in entries if e.path.startswith(tree.path + "/")]
    for entry in sorted((e for e in below if e.type == "d"), key=lambda e: e.path.count("/")):
        parent = nodes.get(_parent(entry.path))
        if parent is not None:
            node = _Node(entry.path, parent, entry.flags)
            parent.children.append(node)
            nodes[entry.path] = node
    own: dict[str, int] = {}
    for entry in below:
        own[_parent(entry.path)] = own.get(_parent(entry.path), 0) + _cost(entry)
    for node in sorted(nodes.values(), key=lambda n: -n.path.count("/")):
        node.cost += own.get(node.path, 0)
        if node.parent is not None:
            node.parent.cost += node.cost
    for entry in below:
        if entry.hard_link:
            _block_between(nodes, entry.path, entry.source)
    return root


def _block_between(nodes: dict[str, _Node], one: str, other: str) -> None:
    """Block every directory holding exactly one of two linked paths."""
    ancestors_one = _ancestors(one)
    ancestors_other = _ancestors(other)
    for path in ancestors_one.symmetric_difference(ancestors_other):
        if path in nodes:
            nodes[path].blocked = True


def _ancestors(path: str) -> set[str]:
    parts = path.split("/")
    return {"/".join(parts[:i]) for i in range(1, len(parts))}


def _carve(root: _Node, target: int) -> list[_Node]:
    """Whole subtrees of `root` adding up to about `target`, largest first."""
    chosen: list[_Node] = []
    total = 0
    frontier = [(-c.cost, c.path, c) for c in root.children]
    heapq.heapify(frontier)
    while frontier and total < target * 0.95 and len(chosen) < MAX_CUT_PATHS:
        _, _, node = heapq.heappop(frontier)
        if not node.blocked and total + node.cost <= target * 1.05:
            chosen.append(node)
            total += node.cost
        elif not node.flags:
            for child in node.children:
                heapq.heappush(frontier, (-child.cost, child.path, child))
    return chosen


def split(
    trees: Sequence[Tree], entries: Sequence[Entry], workers: int, excludes: Sequence[str] = ()
) -> Extractions:
    """Extractions of `trees` for `workers` parallel borgs: one per tree, plus cuts from the
    largest tree while it holds more than its share."""
    built = [(tree, _build(tree, entries)) for tree in trees]
    total = sum(root.cost for _, root in built)
    share = total // max(1, workers)
    extractions = Extractions([])
    names = {e.path.rpartition("/")[2] for e in entries}
    placeholder = PLACEHOLDER
    while placeholder in names:
        placeholder += "_"
    cut_paths: dict[str, list[str]] = {tree.path: [] for tree in trees}
    cuts_left = max(0, workers - 1)
    for tree, root in sorted(built, key=lambda b: -b[1].cost):
        remaining = root.cost
        while cuts_left and remaining > share * 1.2 and share >= MIN_CUT:
            chosen = _carve(root, min(share, remaining // 2))
            cost = sum(n.cost for n in chosen)
            if not chosen or cost < MIN_CUT:
                break
            for node in chosen:
                _detach(node)
            remaining -= cost
            cuts_left -= 1
            paths = tuple(n.path for n in chosen)
            cut_paths[tree.path] += paths
            extractions.jobs.append(Job(paths, tuple(excludes), tree.strip, tree.dest, cost))
            _mark_above(extractions, tree, chosen, placeholder)
    for tree, root in built:
        rest = tuple(excludes) + tuple(cut_paths[tree.path])
        extractions.jobs.append(Job((tree.path,), rest, tree.strip, tree.dest, root.cost))
    extractions.jobs.sort(key=lambda j: -j.cost)
    return extractions


def _detach(node: _Node) -> None:
    """Take a chosen subtree out of its tree, and its cost out of its ancestors'."""
    parent = node.parent
    assert parent is not None
    parent.children.remove(node)
    while parent is not None:
        parent.cost -= node.cost
        parent = parent.parent


def _mark_above(
    extractions: Extractions, tree: Tree, chosen: Iterable[_Node], placeholder: str
) -> None:
    """Put a placeholder into each cut's directory and each directory above it."""
    for node in chosen:
        above: _Node | None = node
        while above is not None and above.path != tree.path:
            target = tree.dest / PurePosixPath(above.path).relative_to(tree.path) / placeholder
            if target not in extractions.placeholders:
                extractions.placeholders.append(target)
            above = above.parent


def verify(trees: Sequence[Tree], entries: Sequence[Entry], skip: Sequence[str] = ()) -> int:
    """Check that every archived item of the trees is in place with its type (and size, for
    files); returns how many were checked."""
    checked = 0
    for tree in trees:
        for entry in entries:
            if not entry.path.startswith(tree.path + "/") or any(
                entry.path == s or entry.path.startswith(s + "/") for s in skip
            ):
                continue
            target = tree.dest / PurePosixPath(entry.path).relative_to(tree.path)
            try:
                st = target.lstat()
            except OSError:
                if "?" in entry.path:  # maybe a name borg could not print
                    continue
                raise UserError(f"{target} is missing after the extraction") from None
            is_type = TYPES.get(entry.type)
            same_type = is_type is None or is_type(st.st_mode)
            # Borg lists a hard link's size as 0.
            wrong_size = entry.type == "-" and not entry.hard_link and st.st_size != entry.size
            if not same_type or wrong_size:
                raise UserError(f"{target} does not match the archive after the extraction")
            checked += 1
    return checked
