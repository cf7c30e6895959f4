"""The only code that runs `borg`: which borg (version), its command lines (commands), the
runner (runner), what a call returned (result), how it reaches ssh repositories (ssh), and
what went wrong when it failed (failures)."""

from .commands import (
    check_argv,
    comment_argv,
    compact_argv,
    create_argv,
    delete_argv,
    export_tar_argv,
    extract_argv,
    extract_stdout_argv,
    info_argv,
    init_argv,
    key_export_argv,
    list_archives_argv,
    list_argv,
    list_exact_argv,
    list_files_argv,
    list_tree_argv,
)
from .failures import NEVER_RETRIED, Cause, diagnose, explain_failure, raw_tail, retryable
from .result import (
    BorgResult,
    Stalled,
    file_statuses,
    is_warning,
    parse_log_json,
    progress_line,
)
from .runner import Borg, BorgProcess, Secrets, raise_for, stop
from .ssh import KEEPALIVE, is_remote, rsh_command, ssh_messages
from .version import MIN_VERSION, checked_version, find_borg

__all__ = [
    "KEEPALIVE",
    "MIN_VERSION",
    "NEVER_RETRIED",
    "Borg",
    "BorgProcess",
    "BorgResult",
    "Cause",
    "Secrets",
    "Stalled",
    "check_argv",
    "checked_version",
    "comment_argv",
    "compact_argv",
    "create_argv",
    "delete_argv",
    "diagnose",
    "explain_failure",
    "export_tar_argv",
    "extract_argv",
    "extract_stdout_argv",
    "file_statuses",
    "find_borg",
    "info_argv",
    "init_argv",
    "is_remote",
    "is_warning",
    "key_export_argv",
    "list_archives_argv",
    "list_argv",
    "list_exact_argv",
    "list_files_argv",
    "list_tree_argv",
    "parse_log_json",
    "progress_line",
    "raise_for",
    "raw_tail",
    "retryable",
    "rsh_command",
    "ssh_messages",
    "stop",
]
