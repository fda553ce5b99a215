"""Package state of lab hosts: a local rpm repository and real ``dnf`` in a per-host install root.

The lab builds ``hostmaint-lab-tools`` 1.0 and 1.1 and ``kernel-lab`` 6.1.0-1.lab and -2.lab with
``rpmbuild``, publishes them with ``createrepo_c``, and installs the old versions into each host's
``root/`` with ``dnf --installroot``. The host's commands (``dnf``, ``yum``, ``rpm``,
``needs-restarting``, ``uname``, ``reboot``) are wrapper scripts in the host's ``bin/``, which the
host's supervisor bind-mounts over ``/usr/local/sbin`` (first on root's PATH) in the host's mount
namespace only. The real system's package database is never touched.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hostmaint.lab.network import LabError, run

REPO_ID = "hostmaint-lab"
KERNEL_PACKAGE = "kernel-lab"
TOOLS_PACKAGE = "hostmaint-lab-tools"


@dataclass(frozen=True)
class RpmSpec:
    name: str
    version: str
    release: str
    arch: str = "x86_64"

    @property
    def nevra(self) -> str:
        return f"{self.name}-{self.version}-{self.release}.{self.arch}"


OLD = (RpmSpec(TOOLS_PACKAGE, "1.0", "1"), RpmSpec(KERNEL_PACKAGE, "6.1.0", "1.lab"))
NEW = (RpmSpec(TOOLS_PACKAGE, "1.1", "1"), RpmSpec(KERNEL_PACKAGE, "6.1.0", "2.lab"))

_SPEC = """\
Name: {name}
Version: {version}
Release: {release}
Summary: hostmaint lab package {name}
License: MIT
BuildArch: {arch}
{extra}

%description
A package of the hostmaint lab; installs one marker file.

%install
mkdir -p %{{buildroot}}/usr/share/hostmaint-lab/{name}
echo {version}-{release} > %{{buildroot}}/usr/share/hostmaint-lab/{name}/{version}-{release}

%files
/usr/share/hostmaint-lab/{name}/{version}-{release}
"""


def build_repo(repo: Path, specs: tuple[RpmSpec, ...] = OLD + NEW) -> Path:
    """Build the rpms (once) and (re)create the repository metadata; returns the repo dir."""
    repo.mkdir(parents=True, exist_ok=True)
    build = repo.parent / "rpmbuild"
    for spec in specs:
        # kernel-lab is install-only like a real kernel (updates add a version beside the running
        # one) and provides "kernel", so `rpm -q --whatprovides kernel` lists it as RHEL's would
        extra = ("Provides: installonlypkg(kernel)\nProvides: kernel = %{version}-%{release}"
                 if spec.name == KERNEL_PACKAGE else "")
        text = _SPEC.format(name=spec.name, version=spec.version, release=spec.release, arch=spec.arch,
                            extra=extra)
        spec_file = build / f"{spec.nevra}.spec"
        if (repo / f"{spec.nevra}.rpm").exists() and spec_file.exists() and spec_file.read_text() == text:
            continue  # built before from this very spec
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(text)
        run(["rpmbuild", "-bb", "--quiet", "--target", spec.arch, "--define", f"_topdir {build}",
             "--define", "__os_install_post %{nil}", "--define", "_build_id_links none", str(spec_file)],
            timeout=120)
        built = build / "RPMS" / spec.arch / f"{spec.nevra}.rpm"
        if not built.exists():
            raise LabError(f"rpmbuild did not produce {built}")
        shutil.copy2(built, repo / built.name)
    run(["createrepo_c", "--quiet", str(repo)], timeout=120)
    return repo


def dnf_base_args(host_dir: Path, repo: Path) -> list[str]:
    """The options that confine dnf to the host's install root and the lab repository."""
    return [
        f"--installroot={host_dir / 'root'}",
        f"--setopt=reposdir={host_dir / 'yum.repos.d'}",
        f"--setopt=cachedir={host_dir / 'dnf-cache'}",
        f"--setopt=installonlypkgs={KERNEL_PACKAGE}",
        "--setopt=installonly_limit=3",
        "--setopt=install_weak_deps=False",
        "--releasever=lab",
        "--nogpgcheck",
    ]


def rpm_env(host_dir: Path) -> dict[str, str]:
    """Environment for rpm/dnf on a host's root.

    Debian's rpm keeps its database in ``~/.rpmdb`` (a Debian default): a HOME holding an
    ``.rpmmacros`` with ``%_dbpath /var/lib/rpm`` makes it the RHEL location inside the install root,
    the same whoever runs the command.
    """
    home = host_dir / "pkg-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / ".rpmmacros").write_text("%_dbpath /var/lib/rpm\n")
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}


def prepare_host_packages(host_dir: Path, repo: Path) -> None:
    """Point the host at the lab repo and install the old versions (fresh install root)."""
    repos_d = host_dir / "yum.repos.d"
    repos_d.mkdir(parents=True, exist_ok=True)
    (repos_d / f"{REPO_ID}.repo").write_text(
        f"[{REPO_ID}]\nname=hostmaint lab\nbaseurl=file://{repo}\nenabled=1\ngpgcheck=0\nmetadata_expire=0\n")
    root = host_dir / "root"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    argv = ["dnf", "-q", "-y", *dnf_base_args(host_dir, repo), "install", *(s.nevra for s in OLD)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=rpm_env(host_dir))
    if proc.returncode != 0:
        raise LabError(f"installing the lab packages into {root} failed: {proc.stderr.strip()}")


BOOT_PIN = "boot-default"  # in the host's state dir: the kernel grubby --set-default pinned


def newest_kernel(host_dir: Path) -> str:
    """``uname -r`` spelling (version-release.arch) of the newest kernel-lab in the host's root."""
    proc = subprocess.run(["rpm", "--root", str(host_dir / "root"), "-q", "--qf",
                           "%{VERSION}-%{RELEASE}.%{ARCH}\\n", KERNEL_PACKAGE],
                          capture_output=True, text=True, timeout=30, env=rpm_env(host_dir))
    versions = [v for v in proc.stdout.split() if v and "not installed" not in v]
    if proc.returncode != 0 or not versions:
        raise LabError(f"no {KERNEL_PACKAGE} installed in {host_dir / 'root'}: {proc.stdout}{proc.stderr}")
    sort = subprocess.run(["sort", "-V"], input="\n".join(versions) + "\n", capture_output=True, text=True)
    return sort.stdout.split()[-1]


def boot_default_kernel(host_dir: Path) -> str:
    """The kernel-lab this host boots: what its own ``grubby --default-kernel`` names (one rule for the
    boot and for what hostmaint reads: the pinned kernel while it is installed, else the newest)."""
    proc = subprocess.run([str(host_dir / "bin" / "grubby"), "--default-kernel"],
                          capture_output=True, text=True, timeout=30)
    release = proc.stdout.strip().removeprefix("/boot/vmlinuz-")
    if proc.returncode != 0 or not release or "/" in release:
        raise LabError(f"grubby --default-kernel in {host_dir} failed: {proc.stdout}{proc.stderr}")
    return release


def write_wrappers(host_dir: Path, repo: Path, supervisor_request: Path) -> Path:
    """Write the host's command wrappers into ``host_dir/bin``; returns that dir."""
    bin_dir = host_dir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    dnf_args = " ".join(f"'{a}'" for a in dnf_base_args(host_dir, repo))
    state = host_dir / "state"
    home = rpm_env(host_dir)["HOME"]
    scripts = {
        "dnf": f"""#!/bin/sh
# hostmaint lab: real dnf, confined to this host's install root and the lab repository
if [ "$1" = needs-restarting ]; then shift; exec /usr/local/sbin/needs-restarting "$@"; fi
HOME='{home}' exec /usr/bin/dnf {dnf_args} "$@"
""",
        "rpm": f"""#!/bin/sh
# hostmaint lab: rpm on this host's install root
HOME='{home}' exec /usr/bin/rpm --root '{host_dir / 'root'}' "$@"
""",
        "needs-restarting": f"""#!/bin/sh
# hostmaint lab: needs-restarting -r says a reboot is required when a kernel-lab was installed since boot
# (as the real one does for its core packages), or the boot default kernel is not the running one
case "$1" in
  -r|--reboothint) ;;
  *) echo "hostmaint lab: only 'needs-restarting -r' is supported" >&2; exit 2 ;;
esac
running=$(cat '{state / 'running-kernel'}')
default=$('{bin_dir / 'grubby'}' --default-kernel | sed 's|^/boot/vmlinuz-||')
booted=$(cut -d. -f1 '{state / 'booted-at'}')
newer=$(HOME='{home}' /usr/bin/rpm --root '{host_dir / 'root'}' -q --qf '%{{INSTALLTIME}}\\n' {KERNEL_PACKAGE} \\
    | awk -v b="$booted" '$1 > b {{n++}} END {{print n+0}}')
if [ "$running" != "$default" ] || [ "$newer" -gt 0 ]; then
    echo "Core libraries or services have been updated since boot-up:"
    echo "  * {KERNEL_PACKAGE}"
    echo
    echo "Reboot is required to fully utilize these updates."
    exit 1
fi
echo "No core libraries or services have been updated since boot-up."
echo "Reboot should not be necessary."
exit 0
""",
        "grubby": f"""#!/bin/sh
# hostmaint lab: the boot loader's default kernel: the pinned kernel-lab while installed, else the newest
installed() {{
    HOME='{home}' /usr/bin/rpm --root '{host_dir / 'root'}' -q --qf '%{{VERSION}}-%{{RELEASE}}.%{{ARCH}}\\n' \\
        {KERNEL_PACKAGE} | grep -v 'not installed' | sort -V
}}
case "$1" in
  --default-kernel)
    pin=$(cat '{state / BOOT_PIN}' 2>/dev/null)
    if [ -n "$pin" ] && installed | grep -qxF "$pin"; then echo "/boot/vmlinuz-$pin"
    else echo "/boot/vmlinuz-$(installed | tail -n 1)"; fi
    exit 0 ;;
  --set-default=*) path=${{1#--set-default=}} ;;
  --set-default) path=$2 ;;
  *) echo "hostmaint lab: only grubby --default-kernel and --set-default are supported" >&2; exit 2 ;;
esac
release=${{path#/boot/vmlinuz-}}
if [ "$release" = "$path" ] || ! installed | grep -qxF "$release"; then
    echo "The param $path is incorrect" >&2; exit 1
fi
echo "$release" > '{state / BOOT_PIN}'
echo "The default is /boot/loader/entries/$release.conf with index 0 and kernel $path"
""",
        "uname": f"""#!/bin/sh
# hostmaint lab: the kernel release is the kernel-lab version this host booted
for a in "$@"; do
  case "$a" in -r|--kernel-release) cat '{state / 'running-kernel'}'; exit 0 ;; esac
done
exec /usr/bin/uname "$@"
""",
        "reboot": f"""#!/bin/sh
# hostmaint lab: ask this host's supervisor for a reboot; it kills every process of the host
echo reboot > '{supervisor_request}.tmp' && mv '{supervisor_request}.tmp' '{supervisor_request}'
kill -USR1 "$(cat '{state / 'supervisor.pid'}')"
echo "hostmaint lab: rebooting $(/usr/bin/hostname)"
exit 0
""",
    }
    scripts["yum"] = scripts["dnf"]
    scripts["shutdown"] = """#!/bin/sh
# hostmaint lab: only a reboot (shutdown -r ...) is possible; a lab host cannot stay powered off
case " $* " in
  *" -r "*|*" --reboot "*) exec /usr/local/sbin/reboot ;;
esac
echo "hostmaint lab: only 'shutdown -r' is supported" >&2
exit 1
"""
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    return bin_dir
