#!/usr/bin/env bash
# Install everything the hostmaint lab and its tests need on a Debian 12 machine (as root).
# Idempotent: re-running installs nothing new and changes nothing that is already right.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system.sh: must run as root (apt-get, users)" >&2
    exit 1
fi

PACKAGES=(
    # libvirt daemon, QEMU and the virsh client the lab defines guests with
    libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86 libvirt-clients
    # building libvirt-python into the venv
    libvirt-dev pkg-config gcc python3-dev
    # one key-only sshd per lab host
    openssh-server openssh-client
    # real dnf against the lab's own rpm repository
    dnf createrepo-c rpm
    # Linux test guests: a busybox initramfs; networking: namespaces, veths, a bridge
    busybox-static cpio iproute2 util-linux procps
    # the unit tests' throwaway PostgreSQL clusters (state and audit on HOSTMAINT_DB=postgresql+psycopg://...)
    postgresql
    # a lab host reached as a non-root user that runs its commands through `sudo -n` (inventory ssh.sudo)
    sudo
    # the TLS lab's own PKI (a CA, per-host certificates for libvirtd and QEMU): hostmaint/lab/pki.py
    openssl
    # the monitoring tests run real Prometheus and Alertmanager servers on loopback (tests/unit/test_monitoring.py)
    prometheus prometheus-alertmanager
)

missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# libvirt's QEMU driver refuses to start without these (libvirt-daemon-system normally makes them).
getent group kvm >/dev/null || addgroup --system kvm
getent group libvirt-qemu >/dev/null || addgroup --system libvirt-qemu
if ! id libvirt-qemu >/dev/null 2>&1; then
    adduser --system --ingroup kvm --no-create-home --home /var/lib/libvirt --disabled-login \
        --gecos "Libvirt Qemu" libvirt-qemu
fi
id -nG libvirt-qemu | grep -qw libvirt-qemu || adduser libvirt-qemu libvirt-qemu >/dev/null

# The Debian cloud kernel booted by the lab's Linux guests (downloaded, never installed).
CACHE=/var/cache/hostmaint-lab
mkdir -p "$CACHE"
fetch_kernel() {
    local pkg
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
    [ -n "$pkg" ] && (cd "$CACHE" && apt-get download -qq "$pkg")
}
if ! ls "$CACHE"/linux-image-*-cloud-amd64_*.deb >/dev/null 2>&1; then
    # stale or missing package lists: refresh once and try again; fail loudly if it still does not come
    fetch_kernel || { apt-get update -qq && fetch_kernel; } || {
        echo "install-system.sh: cannot download the Debian cloud kernel for the lab's Linux guests" >&2
        exit 1
    }
fi
# The lab's operator account for ssh.sudo: a system user with no password and no home of its own, so it can only log in
# to the lab's own sshds (their AuthorizedKeysFile is the lab's key) and there becomes root through sudo -n.
if ! id hmlab-op >/dev/null 2>&1; then
    adduser --system --no-create-home --home / --shell /bin/sh --disabled-password \
        --gecos "hostmaint lab operator" hmlab-op
fi
[ "$(getent passwd hmlab-op | cut -d: -f6)" = / ] || usermod -d / hmlab-op
# '*', not adduser's '!': no password either way, but sshd (without PAM) refuses a locked account's key
[ "$(getent shadow hmlab-op | cut -d: -f2)" = '*' ] || usermod -p '*' hmlab-op
SUDOERS=/etc/sudoers.d/hostmaint-lab
if [ ! -f "$SUDOERS" ]; then
    printf 'hmlab-op ALL=(root) NOPASSWD: ALL\n' > "$SUDOERS.tmp"
    chmod 0440 "$SUDOERS.tmp"
    visudo -cqf "$SUDOERS.tmp" && mv "$SUDOERS.tmp" "$SUDOERS"
fi
echo "install-system.sh: ok"
