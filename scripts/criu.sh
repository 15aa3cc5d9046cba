#!/usr/bin/env bash
# Installs CRIU >= 4.2 into a private prefix, from Debian packages, without touching the
# system's packages or apt configuration.
#
# Usage: scripts/criu.sh            (prints the path of the criu entry point last)
#
#   NBAGENT_CRIU_PREFIX  where it goes (default /opt/nbagent/criu)
#
# Why: Debian 12's criu (3.17) fails `criu check`, and trixie's 4.1.1 cannot dump any
# process holding an IPv4 socket on kernels >= 6.16 ("Can't get 1:16 opt"); ipykernel
# always holds one. sid's criu 4.2 works. Its .deb and the newer libraries it needs are
# unpacked (dpkg -x) into the prefix and run through the prefix's own dynamic loader, by
# the wrapper `$PREFIX/bin/criu`.
#
# The mirror is the one the system's apt sources already use; a private apt state
# directory holds the sid and trixie package lists. Idempotent: does nothing when the
# wrapper exists and reports a version >= 4.2.
set -euo pipefail

PREFIX="${NBAGENT_CRIU_PREFIX:-/opt/nbagent/criu}"
WRAPPER="$PREFIX/bin/criu"

log() { echo "criu.sh: $*" >&2; }

version_ok() {
    # criu --version prints "Version: 4.2" (and maybe "GitID: ...").
    local v major minor
    v="$("$1" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n1)" || return 1
    [[ -n "$v" ]] || return 1
    major="${v%%.*}"
    minor="${v#*.}"
    minor="${minor%%.*}"
    [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] || return 1
    ((major > 4 || (major == 4 && minor >= 2)))
}

if [[ -x "$WRAPPER" ]] && version_ok "$WRAPPER"; then
    log "CRIU $("$WRAPPER" --version | sed -n 's/^Version: *//p') already in $PREFIX"
    echo "$WRAPPER"
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    log "must run as root to install into $PREFIX"
    exit 1
fi

# The Debian mirror the system already uses (deb822 sources or a one-line sources.list).
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    mirror="$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' "$f")"
    [[ -n "$mirror" ]] && break
done
if [[ -z "$mirror" && -f /etc/apt/sources.list ]]; then
    mirror="$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) {print $i; exit}}' /etc/apt/sources.list)"
fi
if [[ -z "$mirror" ]]; then
    log "cannot find a Debian mirror in /etc/apt/sources.list{,.d}"
    exit 1
fi
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f "$keyring" ]] || {
    log "missing $keyring (package debian-archive-keyring)"
    exit 1
}

work="$(mktemp -d /tmp/nbagent-criu.XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
cat >"$work/sources.list" <<EOF
deb [signed-by=$keyring] $mirror sid main
deb [signed-by=$keyring] $mirror trixie main
EOF
apt_opts=(
    -o "Dir::Etc::SourceList=$work/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache"
    -o "Dir::Etc::Preferences=/dev/null"
    -o "Dir::Etc::PreferencesParts=/dev/null"
    -o "APT::Get::List-Cleanup=false"
    -o "Debug::NoLocking=true"
    -o "APT::Sandbox::User=root"
)
log "fetching the sid and trixie package lists from $mirror"
apt-get "${apt_opts[@]}" -qq update >&2

from_sid=(criu libcompel1 libnet9 libnl-3-200)
from_trixie=(libc6 libgnutls30t64 libnftables1 libprotobuf-c1 libbsd0 libuuid1 libnftnl11
    libjansson4 libxtables12 libmnl0 libgmp10 libhogweed6t64 libnettle8t64 libidn2-0
    libp11-kit0 libtasn1-6 libunistring5 libffi8 libmd0 libedit2 libtinfo6 libbrotli1
    libzstd1 liblz4-1 zlib1g libcap2 libselinux1 libpcre2-8-0)
pkgs=()
for p in "${from_sid[@]}"; do pkgs+=("$p/sid"); done
for p in "${from_trixie[@]}"; do pkgs+=("$p/trixie"); done
log "downloading ${#pkgs[@]} packages"
(cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download "${pkgs[@]}" >&2)

staging="$PREFIX.new"
rm -rf "$staging"
mkdir -p "$staging"
for deb in "$work"/debs/*.deb; do
    dpkg -x "$deb" "$staging"
done
libdirs="$PREFIX/usr/lib/x86_64-linux-gnu:$PREFIX/lib/x86_64-linux-gnu"
mkdir -p "$staging/bin"
cat >"$staging/bin/criu" <<EOF
#!/bin/sh
# CRIU from Debian sid, run through its own dynamic loader (installed by scripts/criu.sh).
exec $PREFIX/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path $libdirs $PREFIX/usr/sbin/criu "\$@"
EOF
chmod 0755 "$staging/bin/criu"
rm -rf "$PREFIX"
mv "$staging" "$PREFIX"

if ! version_ok "$WRAPPER"; then
    log "installed, but $WRAPPER does not report a version >= 4.2:"
    "$WRAPPER" --version >&2 || true
    exit 1
fi
log "CRIU $("$WRAPPER" --version | sed -n 's/^Version: *//p') installed in $PREFIX"
echo "$WRAPPER"
