"""Try incus-borg on a throwaway private Incus: back up, lose an instance and a profile, restore.

Run as root with `make demo`. Nothing outside a temporary directory is touched: the Incus
daemon, its pools, the Borg repository and incus-borg's staging all live there and are
removed at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from cli import incus_config  # noqa: E402
from harness.incusd import PrivateIncus  # noqa: E402
from harness.server import IncusServer, prepare_server  # noqa: E402


def step(text: str) -> None:
    """Announce a step."""
    print(f"\n==> {text}", flush=True)


def incus_borg(config: Path, *args: str) -> None:
    """Run incus-borg, showing its output; stop the demo if it fails."""
    print("$ incus-borg " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "incus_borg", "-c", str(config), *args], check=True)


def fill(server: IncusServer) -> None:
    """Three containers holding data, one of them on btrfs and using an extra profile."""
    server.daemon.incus("profile", "create", "web")
    server.daemon.incus("profile", "set", "web", "limits.memory=256MiB", "user.role=web")
    server.launch("db", files={"/root/records.bin": (os.urandom(2_000_000), 0, 0, 0o600)})
    server.launch(
        "web", pool="fast", files={"/home/user/site.html": (b"<h1>hi</h1>\n", 1000, 1000, 0o644)}
    )
    server.daemon.incus("profile", "add", "web", "web")
    server.launch("cache", files={"/root/cache.txt": (b"warm\n", 0, 0, 0o644)})


def main() -> int:
    """The demo; returns the exit code."""
    with tempfile.TemporaryDirectory(prefix="incus-borg-demo-") as tmp, PrivateIncus() as daemon:
        step(f"a private Incus in {daemon.incus_dir}: pools default (dir) and fast (btrfs)")
        server = prepare_server(daemon)
        fill(server)
        print(daemon.incus("list", "-c", "nsb", "-f", "compact").stdout)
        config = incus_config(server, Path(tmp))
        step("create the repository and back up the whole server")
        incus_borg(config, "init")
        incus_borg(config, "backup")
        incus_borg(config, "list", "latest")
        before = server.checksums("web")
        profile = daemon.incus("profile", "show", "web").stdout
        step("disaster: instance 'web' and profile 'web' are deleted")
        server.delete("web")
        daemon.incus("profile", "delete", "web")
        step("restore the profile, then the instance")
        incus_borg(config, "restore", "config", "latest", "--profiles", "web")
        incus_borg(config, "restore", "instance", "latest", "web", "--start")
        after = server.checksums("web")
        same_profile = daemon.incus("profile", "show", "web").stdout == profile
        step("check")
        for path, digest in sorted(before.items()):
            mark = "ok" if after.get(path) == digest else "DIFFERENT"
            print(f"  {mark:9} {digest[:16]}  web:{path}")
        print(f"  {'ok' if same_profile else 'DIFFERENT':9} profile web")
        owner = server.owner("web", "/home/user/site.html")
        print(
            f"  {'ok' if owner == (1000, 1000) else 'DIFFERENT':9} /home/user/site.html owned by {owner}"
        )
        good = before == after and same_profile and owner == (1000, 1000)
        step("all restored data matches" if good else "restored data differs")
        return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
