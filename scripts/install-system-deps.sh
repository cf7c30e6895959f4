#!/usr/bin/env bash
# Installs the system packages incus-borg's tests need on Debian 12 (run as root).
# Incus 6.0 LTS comes from the distribution's backports suite; its apt source is
# derived from the machine's existing Debian source, so no host name is written here.
set -euo pipefail

# chromium: the report test renders the page headless.
packages=(python3-venv busybox-static btrfs-progs restic openssh-server rsync chromium
          libacl1-dev liblz4-dev libzstd-dev libxxhash-dev libssl-dev pkg-config)

codename=$(. /etc/os-release && echo "${VERSION_CODENAME}")
backports_list=/etc/apt/sources.list.d/incus-borg-backports.sources

debian_uri() {
    # The URI of the main Debian entry (the one whose suite is the bare codename).
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v c="$codename" '
            /^URIs:/ {uri=$2}
            /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == c) ok=1}
            /^$/ {if (ok && uri) {print uri; exit} ok=0; uri=""}
            END {if (ok && uri) print uri}' "$f" | head -n1
    done
    if [ -f /etc/apt/sources.list ]; then
        awk -v c="$codename" '$1 == "deb" && $3 == c {print $2; exit}' /etc/apt/sources.list
    fi
}

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
command -v incus >/dev/null && [ -x /usr/libexec/incus/incusd ] || missing+=(incus)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [[ " ${missing[*]} " == *" incus "* ]] && [ ! -f "$backports_list" ]; then
    uri=$(debian_uri | head -n1)
    if [ -z "$uri" ]; then
        echo "install-system-deps: no Debian apt source for '$codename' found; add ${codename}-backports by hand" >&2
        exit 2
    fi
    cat >"$backports_list" <<SRC
Types: deb
URIs: $uri
Suites: ${codename}-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
non_incus=()
for p in "${missing[@]}"; do [ "$p" = incus ] || non_incus+=("$p"); done
[ ${#non_incus[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${non_incus[@]}"
if [[ " ${missing[*]} " == *" incus "* ]]; then
    apt-get install -y -qq -t "${codename}-backports" incus
    # Tests run private daemons; the packaged service must not hold the host's dir open.
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        systemctl disable --now incus.service incus.socket 2>/dev/null || true
    fi
fi
