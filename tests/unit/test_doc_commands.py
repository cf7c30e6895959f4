"""Every `incus-borg ...` command line the README and the docs show exists: its subcommands
are commands of `incus_borg.cli.cli`, and each of its flags is an option of the command it
follows (found through click's own command tree, not by reading --help)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from incus_borg.cli import cli

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = "incus-borg"
# Info strings of the fenced blocks that hold command lines (others hold files: ini, yaml).
SHELL_BLOCKS = {"", "sh", "shell", "bash", "console", "text"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
# A code span: a run of backticks, then anything up to the same run (CommonMark).
SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
INCLUDE = re.compile(r'^--8<-- "([^":]+)[^"]*"', re.M)  # pymdownx.snippets
PROMPT = re.compile(r"^(?:\$ |# )")
ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=\S*")  # VAR=value before a command
FLAG = re.compile(r"[\[(]*(-{1,2}[A-Za-z][\w-]*)(?:$|[=\])},.:;|])")
# A word that names subcommands: `restore`, or alternatives such as `instance|volume`.
SUBCOMMAND = re.compile(r"[a-z][a-z0-9-]*(?:\|[a-z][a-z0-9-]*)*")
SEPARATORS = {"|", "||", "&&", ";"}  # end one command; another may follow
REDIRECTS = {">", ">>", "<", "2>", "2>&1"}  # end a command's arguments


@dataclass(frozen=True)
class Shown:
    """One command line as a page shows it: where, and its words after `incus-borg`."""

    where: str
    words: tuple[str, ...]


def documented_files(root: Path = ROOT) -> list[Path]:
    """The README, every docs page, and the files the pages include."""
    pages = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    included = {root / name for page in pages for name in INCLUDE.findall(page.read_text()) if name}
    return pages + sorted(included - set(pages))


def shown_commands(text: str, name: str) -> list[Shown]:
    """The `incus-borg` command lines of a Markdown text, in the order it shows them: lines
    of shell code blocks, after an optional `$ ` or `# ` prompt, and inline code spans
    (`name` says where, in messages)."""
    found = sorted(_shown_commands(text), key=lambda shown: shown[0])
    return [Shown(f"{name}:{line}", words) for line, words in found]


def _shown_commands(text: str) -> Iterator[tuple[int, tuple[str, ...]]]:
    """(line, words) of every command line of a Markdown text, blocks first."""
    for block in FENCE.finditer(text):
        start = text.count("\n", 0, block.start(2))
        if block.group(1) not in SHELL_BLOCKS:
            continue
        for offset, line in _joined_lines(block.group(2)):
            for words in commands_in(PROMPT.sub("", line)):
                yield start + offset + 1, words
    # Spans are looked for outside the blocks, which are blanked out (their lines kept).
    prose = FENCE.sub(lambda block: "\n" * block.group(0).count("\n"), text)
    for span in SPAN.finditer(prose):
        number = prose.count("\n", 0, span.start()) + 1
        content = span.group(2)
        inner = SPAN.findall(content) if len(span.group(1)) > 1 else []
        for piece in [content, *(quoted for _, quoted in inner)]:
            for words in commands_in(" ".join(piece.split())):
                yield number, words


def _joined_lines(block: str) -> Iterator[tuple[int, str]]:
    """The lines of a code block, each with the ones a trailing backslash continues it on."""
    pending: list[str] = []
    first = 0
    for number, line in enumerate(block.splitlines()):
        if not pending:
            first = number
        if line.rstrip().endswith("\\"):
            pending.append(line.rstrip()[:-1])
            continue
        yield first, " ".join([*pending, line])
        pending = []
    if pending:
        yield first, " ".join(pending)


def commands_in(line: str) -> list[tuple[str, ...]]:
    """The words after `incus-borg` of every command a shell line (or code span) runs."""
    words = line.replace("\\|", " ").split()  # `\|`: a table cell's escaped alternative
    found: list[tuple[str, ...]] = []
    current: list[str] | None = None
    expect_command = True
    for i, word in enumerate(words):
        if word.startswith("#"):
            break
        following = words[i + 1] if i + 1 < len(words) else ""
        # `A | B` is a pipe; `[--x | --y]` is a choice between two options of one command.
        is_pipe = word == "|" and not following.startswith(("-", "["))
        if word in SEPARATORS - {"|"} or is_pipe:
            current, expect_command = None, True
        elif word == "|":
            continue
        elif word in REDIRECTS:
            current, expect_command = None, False
        elif expect_command and ASSIGNMENT.fullmatch(word):
            continue
        elif expect_command:
            expect_command = False
            if word == PROGRAM:
                current = []
                found.append(())
        elif current is not None:
            current.append(word)
            found[-1] = tuple(current)
    return [words for words in found if words]  # a bare `incus-borg` names the program


def problems(words: Sequence[str], group: click.Command = cli) -> list[str]:
    """What is wrong with the command line `incus-borg WORDS...`: subcommands that do not
    exist, and flags that are not options of the command they follow. Placeholders
    (`ARCHIVE`, `[P/]NAME`, `...`) are words like any other argument."""
    return _problems(group, _context(group, PROGRAM, None), list(words))


def _context(command: click.Command, name: str, parent: click.Context | None) -> click.Context:
    """The context click gives `command` (its context settings, such as -h, applied)."""
    return click.Context(command, info_name=name, parent=parent, **command.context_settings)


def _problems(command: click.Command, context: click.Context, words: list[str]) -> list[str]:
    found: list[str] = []
    path = context.command_path
    while words:
        word = words.pop(0)
        match = FLAG.match(word)
        if match:
            flag = match.group(1)
            option = _option(command, context, flag)
            if option is None:
                found.append(f"`{path}` has no option {flag}")
            elif not option.is_flag and "=" not in word and words:
                words.pop(0)  # its value, which is no subcommand
            continue
        if not isinstance(command, click.Group):
            continue  # an argument, or a placeholder for one
        if not SUBCOMMAND.fullmatch(word):
            break  # a placeholder for a command (COMMAND, ...): nothing more to check
        for name in word.split("|"):
            sub = command.get_command(context, name)
            if sub is None:
                known = ", ".join(command.list_commands(context))
                found.append(f"`{path}` has no command {name!r} (it has: {known})")
            else:
                found += _problems(sub, _context(sub, name, context), list(words))
        break
    return found


def _option(command: click.Command, context: click.Context, flag: str) -> click.Option | None:
    """The option of `command` spelt `flag` (its help option included), or None."""
    for param in command.get_params(context):
        if isinstance(param, click.Option) and flag in (*param.opts, *param.secondary_opts):
            return param
    return None


def every_shown_command() -> list[Shown]:
    """Every command line of the README and the docs."""
    return [
        shown
        for path in documented_files()
        for shown in shown_commands(path.read_text(), str(path.relative_to(ROOT)))
    ]


def test_every_documented_command_line_exists() -> None:
    shown = every_shown_command()
    assert len(shown) > 50, "the docs' command lines were not found"
    wrong = [
        f"{s.where}: incus-borg {' '.join(s.words)}: {p}" for s in shown for p in problems(s.words)
    ]
    assert wrong == []


def test_every_command_is_documented_somewhere() -> None:
    seen = {" ".join(s.words[:2]) for s in every_shown_command()}
    for name, command in cli.commands.items():
        subs = command.commands if isinstance(command, click.Group) else {}
        for wanted in [f"{name} {sub}" for sub in subs] or [name]:
            assert any(s == wanted or s.startswith(wanted + " ") for s in seen), wanted


SAMPLE = """\
Run `incus-borg backup --dry-run` first, or `incus-borg -c FILE --version`.

```sh
$ incus-borg list --repository offsite --colour
# incus-borg -c /etc/x.yaml restore instance ARCHIVE [P/]NAME [--as NEW] [--pool POOL]...
incus-borg config generate | incus-borg config validate -
incus-borg restore all latest --pool-map default=local \\
    --no-start
BORG_RELOCATED_REPO_ACCESS_IS_OK=yes incus-borg frobnicate --now
```

```ini
# incus-borg bounds every freeze: not a command line
```

| `incus-borg prune [--member NAME \\| --all-members \\| --every]` | a table cell |

`` a message naming `incus-borg restore instance|volume --pool POOL --stream` ``
"""


def test_the_checker_finds_wrong_flags_and_commands() -> None:
    shown = list(shown_commands(SAMPLE, "sample.md"))
    assert [s.words[:2] for s in shown] == [
        ("backup", "--dry-run"),
        ("-c", "FILE"),
        ("list", "--repository"),
        ("-c", "/etc/x.yaml"),
        ("config", "generate"),
        ("config", "validate"),
        ("restore", "all"),
        ("frobnicate", "--now"),
        ("prune", "[--member"),
        ("restore", "instance|volume"),
    ]
    wrong = {s.where: problems(s.words) for s in shown if problems(s.words)}
    assert wrong == {
        "sample.md:4": ["`incus-borg list` has no option --colour"],
        "sample.md:7": ["`incus-borg restore all` has no option --no-start"],
        "sample.md:9": [
            "`incus-borg` has no command 'frobnicate' (it has: backup, check, config, hook, "
            "init, key, list, prune, report, restore, status)"
        ],
        "sample.md:16": ["`incus-borg prune` has no option --every"],
        "sample.md:18": ["`incus-borg restore volume` has no option --stream"],
    }


@pytest.mark.parametrize(
    "line",
    [
        "backup --mode M --instance [P/]NAME --repository LABEL --dry-run --json --progress",
        "--debug restore files ARCHIVE [P/]NAME PATH... --to DIR [--overwrite]",
        "restore all ARCHIVE [--pool-map OLD=NEW[:DRIVER[:KEY=VALUE,...]]]... [--project P]...",
        "check --drill [--instance [P/]NAME]... [--scratch DIR]",
        "restore server --roll-back -h",
        "hook post --failed",
        "key export --paper",
        "restore ...",
    ],
)
def test_placeholders_are_tolerated(line: str) -> None:
    assert problems(line.split()) == []


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("backup --yes", "`incus-borg backup` has no option --yes"),
        ("list --debug", "`incus-borg list` has no option --debug"),  # a global option, too late
        ("hook pre --failed", "`incus-borg hook pre` has no option --failed"),
        ("restore instance ARCHIVE NAME -x", "`incus-borg restore instance` has no option -x"),
        ("key import", "`incus-borg key` has no command 'import' (it has: export)"),
    ],
)
def test_wrong_flags_and_commands_are_named(line: str, problem: str) -> None:
    assert problems(line.split()) == [problem]
