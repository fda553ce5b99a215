"""The patch steps end to end against the simulated RHEL shell: no host, no waiting (fake clock)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from hostmaint import patching, rpm_version
from hostmaint.drivers.memory_shell import SimHostPackages, SimulatedShell
from hostmaint.drivers.ssh import SshShell
from hostmaint.errors import InventoryError, StepError, TransientDriverError
from hostmaint.inventory import HostPolicy, SshKey, SshTarget, VerifyCheck, parse_inventory
from hostmaint.lab.sshd import authorize, make_keypair, start_sshd, write_known_hosts
from hostmaint.models import Cell, CommandResult, HostDiscovery, PackageManager, RebootPolicy

K1, K2 = "5.14.0-362.el9", "5.14.0-427.el9"


class FakeClock:
    """A clock whose sleep advances it; nothing waits for real."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(seconds, 0.001)


class FakeHypervisor:
    """Just enough Hypervisor for verify: libvirtd answers (or not) and reports cells."""

    def __init__(self, cells: tuple[Cell, ...], reachable: bool = True) -> None:
        self.cells = cells
        self.reachable = reachable

    def running_vms(self, host: str) -> tuple[str, ...]:
        if not self.reachable:
            raise TransientDriverError("libvirtd: connection refused", host)
        return ()

    def discover(self, host: str) -> HostDiscovery:
        if not self.reachable:
            raise TransientDriverError("libvirtd: connection refused", host)
        return HostDiscovery(host=host, cells=self.cells)


CELLS = (Cell(id=0, memory_mib=32768, free_mib=30000, cpus=(0, 1, 2, 3)),
         Cell(id=1, memory_mib=32768, free_mib=30000, cpus=(4, 5, 6, 7)))


def make_host(**changes: object) -> SimHostPackages:
    base: dict[str, object] = dict(
        installed={"kernel-core": K1, "glibc": "2.34-83.el9", "bash": "5.1.8-6.el9", "openssl": "1:3.0.7-24.el9",
                   "libfoo": "1.0-1.el9"},
        available={"kernel-core": K2, "glibc": "2.34-100.el9", "openssl": "1:3.0.7-27.el9", "newdep": "2.0-1.el9"},
        security=["openssl"],
        removes=["libfoo"],
    )
    base.update(changes)
    return SimHostPackages(**base)  # type: ignore[arg-type]


def setup(host: SimHostPackages | None = None) -> tuple[SimulatedShell, FakeClock, SimHostPackages]:
    clock = FakeClock()
    state = host or make_host()
    return SimulatedShell({"hv1": state}, clock=clock), clock, state


# --- the whole procedure -----------------------------------------------------------------


def test_full_happy_path_records_diff_reboots_and_verifies() -> None:
    shell, clock, state = setup()
    policy = HostPolicy(verify=[VerifyCheck(name="libvirtd-active", argv=["systemctl", "is-active", "libvirtd"])])

    pre = patching.preflight(shell, "hv1", policy)
    assert pre.package_manager is PackageManager.DNF
    assert pre.free_mib == {"/": 20000, "/var": 20000, "/boot": 800}
    assert {u.package for u in pre.updates} == {"kernel-core.x86_64", "glibc.x86_64", "openssl.x86_64",
                                               "newdep.x86_64"}

    before = patching.installed_packages(shell, "hv1")
    assert before["openssl.x86_64"] == "1:3.0.7-24.el9"
    result = patching.apply_updates(shell, "hv1", policy, pre.package_manager)
    assert result.argv == ("dnf", "-y", "--setopt=exit_on_lock=True", "update", "--refresh",
                           "--setopt=skip_if_unavailable=False")
    assert result.exit_code == 0 and not result.nothing_to_do
    after = patching.installed_packages(shell, "hv1")
    diff = patching.package_diff(before, after)

    assert [c.package for c in diff.installed] == ["newdep.x86_64"]
    assert [c.package for c in diff.removed] == ["libfoo.x86_64"]
    upgraded = {c.package: (c.old, c.new) for c in diff.upgraded}
    assert upgraded["glibc.x86_64"] == ("0:2.34-83.el9", "0:2.34-100.el9")
    assert upgraded["openssl.x86_64"] == ("1:3.0.7-24.el9", "1:3.0.7-27.el9")
    # the kernel is install-only: the new one sits next to the old
    assert upgraded["kernel-core.x86_64"] == (f"0:{K1}", f"0:{K1}, 0:{K2}")
    assert diff.summary() == "1 installed, 3 upgraded, 1 removed"

    decision = patching.reboot_decision(shell, "hv1", policy)
    assert decision.needed and f"{K2}.x86_64" in decision.reason
    assert decision.running_kernel == f"{K1}.x86_64"

    old_boot = state.boot_id
    reboot = patching.reboot_and_wait(shell, "hv1", policy, clock=clock, sleep=clock.sleep, poll_s=1.0)
    assert reboot.old_boot_id == old_boot and reboot.new_boot_id == state.boot_id != old_boot
    assert reboot.down_after_s is not None and reboot.back_after_s >= state.reboot_delay_s
    assert state.reboots == 1

    report = patching.verify_host(shell, FakeHypervisor(CELLS), "hv1", policy, cells_before=CELLS)
    assert report.ok, report.reason()
    by_name = {c.name: c for c in report.checks}
    assert by_name["kernel"].detail == f"running the boot default kernel {K2}.x86_64"
    assert by_name["libvirtd-active"].ok
    assert patching.reboot_decision(shell, "hv1", policy).needed is False


def test_update_with_excludes_and_security_only_passes_them_as_single_arguments() -> None:
    shell, _, state = setup()
    policy = HostPolicy(excludes=["kernel*", "glibc"], security_only=True)
    pre = patching.preflight(shell, "hv1", policy)
    assert [u.package for u in pre.updates] == ["openssl.x86_64"]
    res = patching.apply_updates(shell, "hv1", policy)
    assert res.argv == ("dnf", "-y", "--setopt=exit_on_lock=True", "update", "--refresh",
                        "--setopt=skip_if_unavailable=False", "--exclude=kernel*", "--exclude=glibc", "--security")
    assert state.installed["openssl"] == "1:3.0.7-27.el9"
    assert state.installed["kernel-core"] == K1 and state.installed["glibc"] == "2.34-83.el9"
    assert ("dnf -q --setopt=exit_on_lock=True check-update --refresh --setopt=skip_if_unavailable=False "
            "'--exclude=kernel*' --exclude=glibc --security") in state.log


def test_nothing_to_update() -> None:
    shell, _, _ = setup(make_host(available={}, removes=[]))
    assert patching.preflight(shell, "hv1", HostPolicy()).updates == ()
    res = patching.apply_updates(shell, "hv1", HostPolicy())
    assert res.nothing_to_do
    assert patching.reboot_decision(shell, "hv1", HostPolicy()).needed is False


# --- failures ---------------------------------------------------------------------------


def test_update_failure_is_a_step_error_carrying_what_dnf_said() -> None:
    shell, _, state = setup(make_host(fail_update=True))
    before = dict(state.installed)
    with pytest.raises(StepError) as err:
        patching.apply_updates(shell, "hv1", HostPolicy())
    assert err.value.step == "update" and err.value.host == "hv1"
    assert "dnf update failed (exit 1)" in str(err.value)
    assert "Transaction test error" in str(err.value) and "conflicts with file" in str(err.value)
    assert state.installed == before


@pytest.mark.parametrize(("changes", "expected"), [
    ({"free_mib": {"/": 20000, "/var": 100, "/boot": 800}}, "/var has 100 MiB free, policy needs 512 MiB"),
    ({"free_mib": {"/": 10, "/var": 20000}}, "/ has 10 MiB free"),
    ({"repo_error": "Cannot download repomd.xml: Curl error (7)"}, "Cannot download repomd.xml: Curl error (7)"),
    ({"package_managers": []}, "no package manager"),
])
def test_preflight_failures_name_the_problem(changes: dict[str, object], expected: str) -> None:
    shell, _, _ = setup(make_host(**changes))
    with pytest.raises(StepError) as err:
        patching.preflight(shell, "hv1", HostPolicy())
    assert err.value.step == "preflight" and expected in str(err.value)


def test_preflight_missing_boot_is_fine_and_yum_is_used_when_dnf_is_absent() -> None:
    shell, _, _ = setup(make_host(free_mib={"/": 20000, "/var": 20000}, package_managers=["yum"]))
    pre = patching.preflight(shell, "hv1", HostPolicy())
    assert pre.free_mib == {"/": 20000, "/var": 20000}
    assert pre.package_manager is PackageManager.YUM and "dnf not found" in pre.notes[0]
    assert patching.apply_updates(shell, "hv1", HostPolicy(), pre.package_manager).argv[0] == "yum"


def test_legacy_yum_expires_the_cache_instead_of_refresh() -> None:
    shell, _, state = setup(make_host(package_managers=["yum"], pm_version="3.4.3"))
    pre = patching.preflight(shell, "hv1", HostPolicy(package_manager=PackageManager.YUM))
    assert pre.legacy_yum and len(pre.updates) == 4
    assert "yum --setopt=exit_on_lock=True clean expire-cache" in state.log
    assert "yum -q --setopt=exit_on_lock=True check-update" in state.log


def test_host_that_never_returns_fails_the_reboot_naming_host_and_timeout() -> None:
    shell, clock, _ = setup(make_host(never_returns=True))
    policy = HostPolicy(reboot_timeout_s=120)
    with pytest.raises(StepError) as err:
        patching.reboot_and_wait(shell, "hv1", policy, clock=clock, sleep=clock.sleep, poll_s=5)
    assert err.value.step == "reboot" and err.value.host == "hv1"
    assert "did not come back within 120s" in str(err.value)
    assert 119 <= clock.now - 1000.0 <= 126  # it waited the policy's timeout, in fake time


def test_reboot_slower_than_the_timeout_fails_but_a_faster_one_passes() -> None:
    shell, clock, _ = setup(make_host(reboot_delay_s=300))
    with pytest.raises(StepError, match="did not come back within 200s"):
        patching.reboot_and_wait(shell, "hv1", HostPolicy(reboot_timeout_s=200), clock=clock, sleep=clock.sleep)
    shell, clock, _ = setup(make_host(reboot_delay_s=300))
    res = patching.reboot_and_wait(shell, "hv1", HostPolicy(reboot_timeout_s=400), clock=clock, sleep=clock.sleep)
    assert 300 <= res.back_after_s < 302


def test_reboot_refused_or_ignored() -> None:
    shell, clock, _ = setup(make_host(commands={"reboot": [1, "", "Failed to reboot: Access denied\n"]}))
    with pytest.raises(StepError, match="reboot refused .*Access denied"):
        patching.reboot_and_wait(shell, "hv1", HostPolicy(), clock=clock, sleep=clock.sleep)
    shell, clock, _ = setup(make_host(commands={"reboot": [0, "", ""]}))
    with pytest.raises(StepError, match="did not reboot: boot id still"):
        patching.reboot_and_wait(shell, "hv1", HostPolicy(reboot_timeout_s=30), clock=clock, sleep=clock.sleep)


class HandlerShell:
    """A HostShell answering from a function of argv; it records what ran."""

    def __init__(self, handler: Callable[[tuple[str, ...]], tuple[int, str, str]]) -> None:
        self.handler = handler
        self.ran: list[tuple[str, ...]] = []

    def run(self, host: str, argv: Sequence[str], timeout: float = 60.0) -> CommandResult:
        self.ran.append(tuple(argv))
        code, out, err = self.handler(tuple(argv))
        return CommandResult(host=host, argv=tuple(argv), exit_code=code, stdout=out, stderr=err)

    def close(self) -> None:
        pass


BOOT_1 = "3f1c1b1e-0000-4000-8000-000000000001"
BOOT_2 = "3f1c1b1e-0000-4000-8000-000000000002"


def _blinking_host(down: Sequence[int]) -> Callable[[tuple[str, ...]], tuple[int, str, str]]:
    """A host whose ``reboot`` changes nothing and whose boot-id reads number ``down`` (from 1) find it
    unreachable: otherwise it answers with its old boot id."""
    reads = [0]

    def handler(argv: tuple[str, ...]) -> tuple[int, str, str]:
        if argv == patching.REBOOT_ARGV:
            return 0, "", ""
        reads[0] += 1
        if reads[0] in down:
            raise TransientDriverError("unreachable after 4 attempt(s): connection refused", "hv1")
        return 0, f"{BOOT_1}\n", ""

    return handler


def test_a_host_back_from_being_down_with_its_old_boot_id_did_not_reboot() -> None:
    # a soft reboot (or only its network or sshd restarted): it answers again, on the boot it had
    clock = FakeClock()
    with pytest.raises(StepError, match=f"did not reboot: .*same boot id {BOOT_1}") as err:
        patching.reboot_and_wait(HandlerShell(_blinking_host(range(2, 6))), "hv1", HostPolicy(reboot_timeout_s=30),
                                 clock=clock, sleep=clock.sleep)
    assert "did not come back" not in str(err.value)


def test_a_host_down_again_at_the_deadline_did_not_come_back() -> None:
    # answered once with its old boot id (the shutdown not yet at sshd), then down until the deadline
    clock = FakeClock()
    with pytest.raises(StepError, match="went down after .* did not come back within 30s"):
        patching.reboot_and_wait(HandlerShell(_blinking_host([2, *range(4, 100)])), "hv1",
                                 HostPolicy(reboot_timeout_s=30), clock=clock, sleep=clock.sleep)


@pytest.mark.parametrize(("stdout", "boot_id"), [
    (f"{BOOT_1}\n", BOOT_1), (f"  {BOOT_1.upper()}\r\n", BOOT_1),
])
def test_a_boot_id_is_a_uuid(stdout: str, boot_id: str) -> None:
    assert patching.parse_boot_id(stdout, "hv1") == boot_id


@pytest.mark.parametrize(("stdout", "excerpt"), [
    (f"Welcome to hv1 (bashrc) 06:01:02\n{BOOT_1}\n", "'Welcome to hv1 (bashrc) 06:01:02\\n3f1c1b1e-0000-4000-8000-"),
    ("not-a-uuid\n", "'not-a-uuid'"),
    (f"{{{BOOT_1}}}", f"'{{{BOOT_1}}}'"),
    (BOOT_1.replace("-", ""), f"'{BOOT_1.replace('-', '')}'"),
    (f"urn:uuid:{BOOT_1}", f"'urn:uuid:{BOOT_1}'"),
    ("x" * 500, "... (500 characters)"),
])
def test_anything_else_is_not_a_boot_id(stdout: str, excerpt: str) -> None:
    with pytest.raises(StepError) as err:
        patching.parse_boot_id(stdout, "hv1")
    assert err.value.host == "hv1" and err.value.step == "reboot"
    assert str(err.value).startswith("hv1: cat /proc/sys/kernel/random/boot_id printed ")
    assert excerpt in str(err.value) and "not a boot id" in str(err.value)
    assert len(str(err.value)) < 250  # an excerpt, not the whole output


def test_a_banner_after_the_reboot_is_no_new_boot_id() -> None:
    answers: Iterator[str] = iter([BOOT_1, f"Welcome to hv1\n{BOOT_1}"])

    def host(argv: tuple[str, ...]) -> tuple[int, str, str]:
        return (0, next(answers), "") if argv == patching.BOOT_ID_ARGV else (0, "", "")

    shell, clock = HandlerShell(host), FakeClock()
    with pytest.raises(StepError, match="printed 'Welcome to hv1.*not a boot id") as err:
        patching.reboot_and_wait(shell, "hv1", HostPolicy(reboot_timeout_s=60), clock=clock, sleep=clock.sleep)
    assert err.value.step == "reboot" and shell.ran.count(patching.REBOOT_ARGV) == 1


def test_a_banner_before_the_reboot_fails_it_without_rebooting() -> None:
    shell, clock = HandlerShell(lambda argv: (0, f"Last login: today\n{BOOT_1}\n", "")), FakeClock()
    with pytest.raises(StepError, match="hv1: cat /proc/sys/kernel/random/boot_id printed 'Last login"):
        patching.reboot_and_wait(shell, "hv1", HostPolicy(), clock=clock, sleep=clock.sleep)
    assert shell.ran == [patching.BOOT_ID_ARGV]


def test_a_new_boot_id_is_a_reboot() -> None:
    answers = iter([BOOT_1, BOOT_1, f"{BOOT_2}\n"])

    def host(argv: tuple[str, ...]) -> tuple[int, str, str]:
        return (0, next(answers), "") if argv == patching.BOOT_ID_ARGV else (0, "", "")

    clock = FakeClock()
    result = patching.reboot_and_wait(HandlerShell(host), "hv1", HostPolicy(), clock=clock, sleep=clock.sleep)
    assert (result.old_boot_id, result.new_boot_id) == (BOOT_1, BOOT_2)


# --- reboot decision ------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "host", "needed", "reason"), [
    (RebootPolicy.ALWAYS, {"installed": {"kernel-core": K1}}, True, "policy: always"),
    (RebootPolicy.NEVER, {"installed": {"kernel-core": K2}, "running_kernel": f"{K1}.x86_64"}, False,
     "policy: never"),
    (RebootPolicy.IF_NEEDED, {"installed": {"kernel-core": K1}}, False, "no reboot needed"),
    (RebootPolicy.IF_NEEDED, {"installed": {"kernel-core": K2}, "running_kernel": f"{K1}.x86_64"}, True,
     f"the boot default kernel {K2}.x86_64 is not the running {K1}.x86_64"),
    (RebootPolicy.IF_NEEDED, {"installed": {"kernel-core": K1}, "needs_restart": True}, True,
     "needs-restarting -r: Core libraries"),
    (RebootPolicy.IF_NEEDED, {"installed": {"kernel-core": K1}, "needs_restarting_installed": False}, False,
     "needs-restarting unavailable (exit 127)"),
    (RebootPolicy.IF_NEEDED, {"installed": {"kernel-core": K2}, "running_kernel": f"{K1}.x86_64",
                              "needs_restarting_installed": False}, True, "is not the running"),
    (RebootPolicy.IF_NEEDED, {"installed": {"bash": "5.1-1"}, "running_kernel": "6.1.0-18-amd64"}, False,
     "no reboot needed"),  # a container-like host without kernel packages
])
def test_reboot_decision_table(policy: RebootPolicy, host: dict[str, object], needed: bool, reason: str) -> None:
    shell, _, _ = setup(SimHostPackages(**host))  # type: ignore[arg-type]
    decision = patching.reboot_decision(shell, "hv1", HostPolicy(reboot=policy))
    assert decision.needed is needed
    assert reason in decision.reason


RPM_KERNELS = shlex.join(["rpm", "-q", "--whatprovides", "--qf", patching.KERNEL_QUERYFORMAT,
                          *patching.KERNEL_CAPABILITIES])
RUNNING = f"{K1}.x86_64"


@pytest.mark.parametrize(("answer", "expected"), [
    # rpm killed by a signal (the SSH driver reports -1) after printing only the running kernel
    ((-1, f"{RUNNING}\n", ""), "exit -1: killed by a signal"),
    ((-1, "", ""), "exit -1: killed by a signal"),  # ... or before printing anything
    ((0, "", ""), "exit 0 says a package provides a kernel, but no kernel was listed"),
    ((1, f"{RUNNING}\n", ""), "exit 1 but 0 'no package provides' line(s)"),
    ((3, "", ""), "failed (exit 3)"),
    ((1, "no package provides kernel\n", "error: rpmdb: damaged header\n"),
     "failed (exit 1): error: rpmdb: damaged header"),
    ((2, "kein Paket stellt kernel bereit\nkein Paket stellt kernel-core bereit\n", ""),
     "unexpected output line 'kein Paket stellt kernel bereit'"),
])
def test_a_kernel_list_that_does_not_add_up_is_an_error_not_an_answer(
        answer: tuple[int, str, str], expected: str) -> None:
    host = make_host(installed={"kernel-core": K2}, running_kernel=RUNNING, commands={RPM_KERNELS: list(answer)})
    shell, _, _ = setup(host)
    with pytest.raises(StepError) as err:
        patching.reboot_decision(shell, "hv1", HostPolicy())
    assert err.value.host == "hv1" and err.value.step == "reboot-decision"
    assert f"rpm -q --whatprovides kernel kernel-core: {expected}" in str(err.value)
    report = patching.verify_host(shell, FakeHypervisor(CELLS), "hv1", HostPolicy(), cells_before=CELLS)
    kernel = {c.name: c for c in report.checks}["kernel"]
    assert not report.ok and not kernel.ok and not kernel.skipped and expected in kernel.detail


@pytest.mark.parametrize(("answer", "kernels"), [
    ((2, "no package provides kernel\nno package provides kernel-core\n", ""), ()),  # rpm says: none at all
    ((1, f"no package provides kernel-core\n{RUNNING}\n", ""), (RUNNING,)),  # RHEL 7: only "kernel"
    ((0, f"{RUNNING}\n{K2}.x86_64\n{K2}.x86_64\n", ""), (RUNNING, f"{K2}.x86_64")),  # one per capability
])
def test_kernel_lists_rpm_vouches_for(answer: tuple[int, str, str], kernels: tuple[str, ...]) -> None:
    shell, _, _ = setup(make_host(commands={RPM_KERNELS: list(answer)}))
    assert patching.installed_kernels(shell, "hv1") == kernels


def test_needs_restarting_killed_by_a_signal_is_no_answer() -> None:
    shell, _, _ = setup(make_host(commands={"needs-restarting -r": [-1, "", ""]}))
    with pytest.raises(StepError, match="hv1: needs-restarting -r: exit -1: killed by a signal") as err:
        patching.reboot_decision(shell, "hv1", HostPolicy())
    assert err.value.step == "reboot-decision"


# --- verify ------------------------------------------------------------------------------------


def test_verify_reports_every_failed_check_without_raising() -> None:
    shell, _, _ = setup(make_host(installed={"kernel-core": K2}, running_kernel=f"{K1}.x86_64",
                                  failed_units=["kdump.service"],
                                  commands={"systemctl is-active libvirtd": [3, "inactive\n", ""]}))
    policy = HostPolicy(verify=[
        VerifyCheck(name="libvirtd-active", argv=["systemctl", "is-active", "libvirtd"]),
        VerifyCheck(name="has-tool", argv=["/usr/local/bin/site-check", "--quick"]),
        VerifyCheck(name="expects-1", argv=["false"], expect_exit=1),
    ])
    changed = (CELLS[0], CELLS[1].model_copy(update={"cpus": (4, 5, 6), "memory_mib": 16384}))
    report = patching.verify_host(shell, FakeHypervisor(changed), "hv1", policy, cells_before=CELLS)
    assert report.ok is False
    by_name = {c.name: c for c in report.checks}
    assert not by_name["kernel"].ok and f"running {K1}.x86_64, boot default kernel is {K2}.x86_64" in \
        by_name["kernel"].detail
    assert by_name["libvirtd"].ok
    assert not by_name["numa"].ok and "cell 1 cpus [4, 5, 6, 7] -> [4, 5, 6]" in by_name["numa"].detail
    assert "cell 1 memory 32768 -> 16384 MiB" in by_name["numa"].detail
    assert not by_name["systemd"].ok and "kdump.service" in by_name["systemd"].detail
    assert not by_name["libvirtd-active"].ok and "exit 3, expected 0" in by_name["libvirtd-active"].detail
    assert not by_name["has-tool"].ok and "exit 127" in by_name["has-tool"].detail
    assert by_name["expects-1"].ok
    assert {c.name for c in report.failures} == {"kernel", "numa", "systemd", "libvirtd-active", "has-tool"}
    assert "has-tool: /usr/local/bin/site-check --quick: exit 127" in report.reason()


def test_a_host_whose_site_pinned_its_old_kernel_reboots_into_it_and_passes_verify_with_a_warning() -> None:
    # a regression in the new kernel: the site keeps booting the old one (grubby --set-default,
    # UPDATEDEFAULT=no). Expecting the newest called every correct boot of it a failure, every window
    shell, clock, state = setup(make_host(boot_pin=f"{K1}.x86_64"))
    policy = HostPolicy()
    patching.apply_updates(shell, "hv1", policy)
    decision = patching.reboot_decision(shell, "hv1", policy)
    # glibc and the kernel changed since boot: needs-restarting asks for the reboot, not the kernel
    assert decision.needed and decision.boot_kernel == f"{K1}.x86_64" and decision.newest_kernel == f"{K2}.x86_64"
    assert "boot default" not in decision.reason and "needs-restarting -r" in decision.reason
    patching.reboot_and_wait(shell, "hv1", policy, clock=clock, sleep=clock.sleep, poll_s=1.0)
    assert state.running_kernel == f"{K1}.x86_64"
    report = patching.verify_host(shell, FakeHypervisor(CELLS), "hv1", policy, cells_before=CELLS)
    kernel = {c.name: c for c in report.checks}["kernel"]
    assert report.ok and kernel.ok and kernel.warning, report.reason()
    assert kernel.detail == (f"running the boot default kernel {K1}.x86_64; newer kernel {K2}.x86_64 installed "
                             "and not the boot default (pinned: grubby --set-default)")
    # the next window: nothing new since that boot, so no reboot
    assert not patching.reboot_decision(shell, "hv1", policy).needed


def test_a_host_that_booted_another_kernel_than_its_boot_default_fails_verify() -> None:
    shell, clock, state = setup()
    policy = HostPolicy()
    patching.apply_updates(shell, "hv1", policy)
    patching.reboot_and_wait(shell, "hv1", policy, clock=clock, sleep=clock.sleep, poll_s=1.0)
    state.running_kernel = f"{K1}.x86_64"  # the new kernel panicked; the bootloader fell back to the old
    report = patching.verify_host(shell, FakeHypervisor(CELLS), "hv1", policy, cells_before=CELLS)
    kernel = {c.name: c for c in report.checks}["kernel"]
    assert not report.ok and not kernel.ok
    assert kernel.detail == f"running {K1}.x86_64, boot default kernel is {K2}.x86_64"  # the fallback
    decision = patching.reboot_decision(shell, "hv1", policy)
    assert decision.needed and f"the boot default kernel {K2}.x86_64 is not the running {K1}.x86_64" in decision.reason


@pytest.mark.parametrize("answer", [
    [127, "", "bash: line 1: grubby: command not found\n"],
    [1, "", "sudo: grubby: command not found\n"],  # sudo -n says so with exit 1
    [0, "", ""],  # no default entry
])
def test_without_grubby_the_newest_installed_kernel_is_what_a_reboot_brings(answer: list[int | str]) -> None:
    shell, clock, state = setup(make_host(boot_pin=f"{K1}.x86_64", commands={"grubby --default-kernel": answer}))
    assert patching.boot_kernel(shell, "hv1") is None
    patching.apply_updates(shell, "hv1", HostPolicy())
    decision = patching.reboot_decision(shell, "hv1", HostPolicy())
    assert decision.needed and f"newest installed kernel {K2}.x86_64 is not the running" in decision.reason


@pytest.mark.parametrize("stdout", [
    "/boot/vmlinuz-5.14.0; touch /tmp/x\n",
    "/boot/vmlinuz-5.14.0-427.el9.x86_64\n/boot/vmlinuz-5.14.0-362.el9.x86_64\n",
    "grubby: bad config\n",
    "/boot/vmlinuz-\n",
])
def test_grubby_output_that_is_not_one_kernel_path_is_refused_naming_the_host(stdout: str) -> None:
    shell, _, _ = setup(make_host(commands={"grubby --default-kernel": [0, stdout, ""]}))
    with pytest.raises(StepError, match=r"hv1.*grubby --default-kernel: expected one /boot/vmlinuz-<release> line"):
        patching.boot_kernel(shell, "hv1")
    failing, _, _ = setup(make_host(commands={"grubby --default-kernel": [1, "", "grubby: fatal error\n"]}))
    with pytest.raises(StepError, match=r"grubby --default-kernel failed \(exit 1\)"):
        patching.boot_kernel(failing, "hv1")


@pytest.mark.parametrize(("reboot", "ok", "warning"), [
    (RebootPolicy.NEVER, True, True),  # the old kernel runs on purpose: pending, not failed
    (RebootPolicy.IF_NEEDED, False, False),  # the same host without its reboot: still a failure
    (RebootPolicy.ALWAYS, False, False),
])
def test_a_kernel_update_without_a_reboot_fails_verify_unless_the_policy_never_reboots(
        reboot: RebootPolicy, ok: bool, warning: bool) -> None:
    shell, _, state = setup()
    policy = HostPolicy(reboot=reboot)
    patching.apply_updates(shell, "hv1", policy)
    assert state.kernels() == [f"{K1}.x86_64", f"{K2}.x86_64"] and state.reboots == 0
    report = patching.verify_host(shell, FakeHypervisor(CELLS), "hv1", policy, cells_before=CELLS)
    kernel = {c.name: c for c in report.checks}["kernel"]
    assert (report.ok, kernel.ok, kernel.warning) == (ok, ok, warning)
    if ok:
        assert kernel.detail == (f"the boot default kernel {K2}.x86_64 is newer than the running {K1}.x86_64: "
                                 "reboot pending by policy (reboot: never)")
        assert report.warnings == (kernel,) and report.reason() == "all checks passed"
    else:
        assert report.reason() == f"kernel: running {K1}.x86_64, boot default kernel is {K2}.x86_64"


def test_never_reboot_still_applies_every_other_check() -> None:
    shell, _, _ = setup(make_host(installed={"kernel-core": K2}, running_kernel=f"{K1}.x86_64",
                                  failed_units=["kdump.service"]))
    report = patching.verify_host(shell, FakeHypervisor(CELLS), "hv1", HostPolicy(reboot=RebootPolicy.NEVER),
                                  cells_before=CELLS)
    assert not report.ok and [c.name for c in report.failures] == ["systemd"]
    assert [c.name for c in report.warnings] == ["kernel"]


def test_never_reboot_does_not_excuse_a_running_kernel_newer_than_any_installed() -> None:
    # not "pending": the newest installed kernel is older than the running one (its package is gone)
    shell, _, _ = setup(make_host(installed={"kernel-core": K1}, running_kernel=f"{K2}.x86_64"))
    report = patching.verify_host(shell, FakeHypervisor(CELLS), "hv1", HostPolicy(reboot=RebootPolicy.NEVER),
                                  cells_before=CELLS)
    assert not report.ok and report.reason() == f"kernel: running {K2}.x86_64, boot default kernel is {K1}.x86_64"


def test_verify_libvirtd_down_and_na_checks() -> None:
    shell, _, _ = setup(SimHostPackages(installed={"bash": "5.1-1"}, has_systemd=False))
    report = patching.verify_host(shell, FakeHypervisor(CELLS, reachable=False), "hv1", HostPolicy(),
                                  cells_before=None)
    by_name = {c.name: c for c in report.checks}
    assert by_name["kernel"].ok and by_name["kernel"].skipped and by_name["kernel"].detail.startswith("n/a")
    assert by_name["systemd"].ok and by_name["systemd"].skipped
    assert by_name["numa"].skipped
    assert not by_name["libvirtd"].ok and "connection refused" in by_name["libvirtd"].detail
    assert report.ok is False and [c.name for c in report.failures] == ["libvirtd"]


def test_verify_while_host_is_down_fails_the_checks_instead_of_raising() -> None:
    shell, clock, state = setup()
    state.down_until = clock.now + 60
    report = patching.verify_host(shell, FakeHypervisor(CELLS), "hv1", HostPolicy(), cells_before=CELLS)
    assert not report.ok and "simulated host is down" in report.reason()


class LateLibvirtd(FakeHypervisor):
    """libvirtd refuses connections until ``up_at`` on the test's clock (it starts after sshd)."""

    def __init__(self, clock: Callable[[], float], up_at: float) -> None:
        super().__init__(CELLS)
        self.clock, self.up_at = clock, up_at

    def running_vms(self, host: str) -> tuple[str, ...]:
        self.reachable = self.clock() >= self.up_at
        return super().running_vms(host)


def test_verify_waits_for_a_libvirtd_that_starts_after_the_host_answers() -> None:
    shell, clock, _ = setup()
    report, attempts = patching.verify_host_settled(shell, LateLibvirtd(clock, clock.now + 12), "hv1",
                                                    HostPolicy(), cells_before=CELLS, clock=clock, sleep=clock.sleep)
    assert report.ok and attempts == 4, report.reason()  # asked at +0, +5, +10, +15 s


def test_verify_gives_up_on_a_libvirtd_that_never_answers_naming_it() -> None:
    shell, clock, _ = setup()
    start = clock.now
    report, _ = patching.verify_host_settled(shell, FakeHypervisor(CELLS, reachable=False), "hv1",
                                             HostPolicy(reboot_timeout_s=30), cells_before=CELLS, clock=clock,
                                             sleep=clock.sleep)
    assert not report.ok and "libvirtd: connection refused" in report.reason()
    assert 25 <= clock.now - start <= 30  # the policy's reboot timeout, shorter than VERIFY_SETTLE_S


def test_verify_does_not_wait_when_a_check_got_an_answer_and_failed() -> None:
    # the kernel is wrong: waiting for libvirtd changes nothing about that
    shell, clock, _ = setup(make_host(running_kernel="4.18.0-1.el8.x86_64"))
    report, attempts = patching.verify_host_settled(shell, FakeHypervisor(CELLS, reachable=False), "hv1",
                                                    HostPolicy(), cells_before=CELLS, clock=clock,
                                                    sleep=clock.sleep)
    assert not report.ok and attempts == 1 and "kernel" in report.reason()


def test_a_systemd_probe_killed_by_a_signal_fails_the_check_instead_of_skipping_it() -> None:
    shell, _, _ = setup(make_host(commands={"test -d /run/systemd/system": [-1, "", ""]}))
    report = patching.verify_host(shell, FakeHypervisor(CELLS), "hv1", HostPolicy(), cells_before=CELLS)
    systemd = {c.name: c for c in report.checks}["systemd"]
    assert not report.ok and not systemd.ok and not systemd.skipped
    assert systemd.detail == "test -d /run/systemd/system: exit -1: (no output)"


DF_HEADER = "Filesystem 1048576-blocks Used Available Capacity Mounted on\n"


@pytest.mark.parametrize(("row", "available"), [
    ("/dev/sda1 100 60 40 60% /\n", 40),
    ("/dev/sda1 100 50 50 50% /mnt/my disk\n", 50),  # a mount point with a space
    ("/dev/mapper/vg0-root   51175   9000   42175     18% /\n", 42175),
    ("//nas/share 2 1 20 5 200 150 50 75% /mnt/x 1 2 3%\n", 50),  # a device with spaces and digits
])
def test_df_available_is_found_whatever_the_mount_point(row: str, available: int) -> None:
    shell = HandlerShell(lambda argv: (0, DF_HEADER + row, ""))
    assert patching.free_space(shell, "hv1", ["/"]) == {"/": available}


@pytest.mark.parametrize("stdout", [DF_HEADER, DF_HEADER + "/dev/sda1 100 50 50 - /\n", "garbage\n"])
def test_df_output_without_the_numbers_is_an_error(stdout: str) -> None:
    with pytest.raises(StepError, match=r"hv1: df -Pm /: unexpected output") as err:
        patching.free_space(HandlerShell(lambda argv: (0, stdout, "")), "hv1", ["/"])
    assert err.value.step == "preflight"


# --- pure pieces ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b", "expected"), [
    ("1.0", "1.0", 0), ("1.0", "1.1", -1), ("1.10", "1.9", 1), ("1.0a", "1.0", 1), ("1.0~rc1", "1.0", -1),
    ("1.0^git1", "1.0", 1), ("1.0^git1", "1.0.1", -1), ("2.0", "1.99", 1), ("1.01", "1.1", 0),
    ("a", "1", -1), ("5.14.0", "5.14.0", 0), ("427.el9", "362.24.1.el9_3", 1), ("1.0~rc1", "1.0~rc2", -1),
])
def test_rpmvercmp(a: str, b: str, expected: int) -> None:
    assert rpm_version.rpmvercmp(a, b) == expected
    assert rpm_version.rpmvercmp(b, a) == -expected


def test_evr_and_newest_kernel() -> None:
    assert rpm_version.evr_compare("1:1.0-1", "2.0-1") == 1
    assert rpm_version.evr_compare("0:2.0-1", "2.0-1") == 0
    assert rpm_version.newest_kernel(["5.14.0-70.el9.x86_64", "5.14.0-427.el9.x86_64", "5.14.0-362.el9.x86_64"]) \
        == "5.14.0-427.el9.x86_64"


def test_parse_check_update_handles_banner_wrapped_names_and_obsoletes() -> None:
    out = ("Last metadata expiration check: 0:00:03 ago on Thu 26 Nov 2026.\n\n"
           "glibc.x86_64            2.34-100.el9         baseos\n"
           "a-very-long-package-name-that-wraps.noarch\n"
           "                        1.2-3.el9            appstream\n"
           "Obsoleting Packages\n"
           "grub2-tools.x86_64      1:2.06-70.el9        baseos\n")
    ups = patching.parse_check_update(out)
    assert [(u.package, u.version, u.repo) for u in ups] == [
        ("glibc.x86_64", "2.34-100.el9", "baseos"),
        ("a-very-long-package-name-that-wraps.noarch", "1.2-3.el9", "appstream"),
    ]


def test_package_diff_is_pure_and_symmetric() -> None:
    before = {"a.x86_64": "0:1-1", "b.x86_64": "0:1-1"}
    after = {"b.x86_64": "0:2-1", "c.noarch": "0:1-1"}
    diff = patching.package_diff(before, after)
    assert [(c.package, c.old, c.new) for c in diff.installed] == [("c.noarch", "", "0:1-1")]
    assert [(c.package, c.old, c.new) for c in diff.upgraded] == [("b.x86_64", "0:1-1", "0:2-1")]
    assert [(c.package, c.old, c.new) for c in diff.removed] == [("a.x86_64", "0:1-1", "")]
    assert patching.package_diff(after, after).empty


def test_a_policy_built_in_code_with_a_bad_exclude_is_refused_before_anything_runs() -> None:
    shell, _, state = setup()
    policy = HostPolicy.model_construct(**{**HostPolicy().model_dump(), "excludes": ["kernel; rm -rf /"]})
    with pytest.raises(StepError, match="is not a package name or glob"):
        patching.apply_updates(shell, "hv1", policy)
    assert not any("update" in line for line in state.log)


# --- injection at inventory load ----------------------------------------------------------------------

BAD_GLOBS = ["kernel; touch /tmp/pwned", "$(id)", "`id`", "kernel foo", "kernel\nfoo", "a|b", "x>y", "'q'", ""]


def _inventory(cluster_excludes: list[str], host_excludes: list[str] | None = None) -> dict[str, object]:
    host: dict[str, object] = {
        "name": "hv1", "cluster": "c1", "libvirt_uri": "qemu:///system",
        "ssh": {"address": "127.0.0.1", "key": {"file": "id"}, "known_hosts": "kh"},
    }
    if host_excludes is not None:
        host["policy"] = {"excludes": host_excludes}
    return {"clusters": [{"name": "c1", "host_policy": {"excludes": cluster_excludes}}], "hosts": [host]}


@pytest.mark.parametrize("bad", BAD_GLOBS)
def test_excludes_with_shell_syntax_are_rejected_at_load_naming_the_field(bad: str) -> None:
    with pytest.raises(InventoryError) as err:
        parse_inventory(_inventory(["ok-pkg", bad]), "inv.yaml")
    assert "clusters[0].host_policy.excludes" in str(err.value)
    assert "not a package name or glob" in str(err.value)
    with pytest.raises(InventoryError) as err:
        parse_inventory(_inventory([], [bad]), "inv.yaml")
    assert "hosts[0].policy.excludes (host hv1)" in str(err.value)


def test_good_globs_load() -> None:
    inv = parse_inventory(_inventory(["kernel*", "python3.11-libs", "libstdc++", "foo_bar-1.2"]))
    assert inv.policy_for("hv1").excludes == ["kernel*", "python3.11-libs", "libstdc++", "foo_bar-1.2"]


# --- the same steps with real dnf and rpm, over a real sshd ------------------------------------------

SPEC = """Name: %{pname}
Version: %{ver}
Release: 1
Summary: hostmaint test package
License: MIT
BuildArch: noarch
%{?req:Requires: %{req}}
%{?obs:Obsoletes: %{obs}}
%{?prov:Provides: %{prov}}
%description
hostmaint test package
%install
mkdir -p %{buildroot}$(dirname %{path})
echo %{pname}-%{ver} > %{buildroot}%{path}
%files
%{path}
"""


def _real_tools() -> bool:
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("dnf", "rpm", "rpmbuild", "createrepo_c")) \
        and Path("/usr/sbin/sshd").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _real_tools(), reason="needs root, dnf, rpm, rpmbuild, createrepo_c and sshd")
def test_real_dnf_and_rpm_over_ssh_end_to_end(tmp_path: Path) -> None:
    """dnf 4 in an installroot (wrapped so the host's own dnf/rpm see it) behind a loopback sshd."""
    repo, root, bindir = tmp_path / "repo", tmp_path / "root", tmp_path / "bin"
    for d in (repo, root, bindir, tmp_path / "repos.d"):
        d.mkdir()
    (tmp_path / "pkg.spec").write_text(SPEC)

    def build(name: str, ver: str, req: str = "", obs: str = "", path: str = "", prov: str = "") -> None:
        argv = ["rpmbuild", "-bb", "--nodeps", "--quiet", "--define", f"_topdir {tmp_path / 'top'}",
                "--define", f"_rpmdir {repo}",
                "--define", "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm",
                "--define", f"pname {name}", "--define", f"ver {ver}",
                "--define", f"path {path or f'/usr/share/{name}/version'}"]
        argv += ["--define", f"req {req}"] if req else []
        argv += ["--define", f"obs {obs}"] if obs else []
        argv += ["--define", f"prov {prov}"] if prov else []
        subprocess.run([*argv, str(tmp_path / "pkg.spec")], check=True, capture_output=True)

    (tmp_path / "repos.d" / "hm.repo").write_text(f"[hm]\nname=hm\nbaseurl=file://{repo}\ngpgcheck=0\n")
    (bindir / "dnf").write_text(f"#!/bin/sh\nexec /usr/bin/dnf --installroot={root} --releasever=9 "
                                f"--setopt=reposdir={tmp_path / 'repos.d'} --setopt=cachedir={tmp_path / 'cache'} "
                                '"$@"\n')
    (bindir / "rpm").write_text(f'#!/bin/sh\nexec /usr/bin/rpm --root={root} "$@"\n')
    running = tmp_path / "running-kernel"
    running.write_text("6.1.0-1.noarch\n")
    (bindir / "uname").write_text(f'#!/bin/sh\n[ "$1" = -r ] && exec cat {running}\nexec /usr/bin/uname "$@"\n')
    for w in bindir.iterdir():
        w.chmod(0o755)
    for name in ("hmdemo", "hmold", "hmpinned", "hmconflict"):
        build(name, "1.0")
    # any package providing "kernel" is a kernel, to rpm queries and to dnf (install-only: versioned files)
    build("hmkernel", "6.1.0", prov="kernel", path="/boot/vmlinuz-hm-6.1.0")
    subprocess.run(["createrepo_c", "-q", str(repo)], check=True)
    subprocess.run([str(bindir / "dnf"), "-y", "-q", "install", "hmdemo", "hmold", "hmpinned", "hmconflict",
                    "hmkernel"], check=True, capture_output=True)
    build("hmkernel", "6.1.1", prov="kernel", path="/boot/vmlinuz-hm-6.1.1")
    build("hmdemo", "1.1", req="hmnew", obs="hmold")
    build("hmnew", "1.0")
    build("hmpinned", "2.0")
    build("hmconflict", "1.1", path="/usr/share/hmdemo/version")  # a file another package owns
    subprocess.run(["createrepo_c", "-q", "--update", str(repo)], check=True)

    key, pub = make_keypair(tmp_path / "client")
    sshd = start_sshd(tmp_path / "server", authorized_keys=authorize(tmp_path / "ak", [pub]),
                      extra_env={"PATH": f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin"})
    known = write_known_hosts(tmp_path / "known_hosts", [sshd])
    shell = SshShell({"hv1": SshTarget(address="127.0.0.1", port=sshd.port, key=SshKey(file=str(key)),
                                       known_hosts=str(known))})
    try:
        # the conflicting update fails: StepError with dnf's own words, nothing changed
        before = patching.installed_packages(shell, "hv1")
        assert before == {"hmconflict.noarch": "0:1.0-1", "hmdemo.noarch": "0:1.0-1", "hmkernel.noarch": "0:6.1.0-1",
                          "hmold.noarch": "0:1.0-1", "hmpinned.noarch": "0:1.0-1"}
        assert patching.reboot_decision(shell, "hv1", HostPolicy()).needed is False
        with pytest.raises(StepError) as err:
            patching.apply_updates(shell, "hv1", HostPolicy(excludes=["hmpin*"]))
        assert err.value.step == "update" and "Transaction test error" in str(err.value)
        assert "/usr/share/hmdemo/version conflicts" in str(err.value)
        assert patching.installed_packages(shell, "hv1") == before

        policy = HostPolicy(excludes=["hmpin*", "hmconflict"], min_free_mib=1,
                            verify=[VerifyCheck(name="hmdemo-installed", argv=["rpm", "-q", "hmdemo"])])
        pre = patching.preflight(shell, "hv1", policy)
        assert pre.package_manager is PackageManager.DNF and pre.package_manager_version.startswith("4.")
        assert [(u.package, u.version) for u in pre.updates] == [("hmdemo.noarch", "1.1-1"),
                                                                  ("hmkernel.noarch", "6.1.1-1")]
        result = patching.apply_updates(shell, "hv1", policy, pre.package_manager)
        assert result.exit_code == 0 and not result.nothing_to_do
        diff = patching.package_diff(before, patching.installed_packages(shell, "hv1"))
        assert [(c.package, c.new) for c in diff.installed] == [("hmnew.noarch", "0:1.0-1")]
        assert [(c.package, c.old, c.new) for c in diff.upgraded] == [("hmdemo.noarch", "0:1.0-1", "0:1.1-1"),
                                                                      ("hmkernel.noarch", "0:6.1.0-1",
                                                                       "0:6.1.0-1, 0:6.1.1-1")]
        assert [(c.package, c.old) for c in diff.removed] == [("hmold.noarch", "0:1.0-1")]
        assert patching.apply_updates(shell, "hv1", policy).nothing_to_do

        decision = patching.reboot_decision(shell, "hv1", policy)  # no needs-restarting on this host
        assert decision.needed is True
        assert decision.reason == ("newest installed kernel 6.1.1-1.noarch is not the running 6.1.0-1.noarch; "
                                   "needs-restarting unavailable (exit 127)")
        report = patching.verify_host(shell, FakeHypervisor(CELLS), "hv1", policy, cells_before=CELLS)
        assert not report.ok and report.reason() == "kernel: running 6.1.0-1.noarch, newest installed is 6.1.1-1.noarch"
        running.write_text("6.1.1-1.noarch\n")  # "rebooted" into it
        report = patching.verify_host(shell, FakeHypervisor(CELLS), "hv1", policy, cells_before=CELLS)
        assert report.ok, report.reason()
        assert {c.name for c in report.checks if c.skipped} == (
            {"systemd"} if not Path("/run/systemd/system").is_dir() else set())

        (tmp_path / "repos.d" / "hm.repo").write_text("[hm]\nname=hm\nbaseurl=file:///nonexistent\ngpgcheck=0\n")
        with pytest.raises(StepError, match="repositories not reachable.*exit 1"):
            patching.preflight(shell, "hv1", policy)
    finally:
        shell.close()
        sshd.stop()


# --- another run holds the package manager's lock ----------------------------------------------


@pytest.mark.parametrize("said", [
    "RPMDB already locked by 7154\n  The application with PID 7154 is: dnf-automatic\n",
    "Existing lock /var/run/yum.pid: another copy is running as pid 7154.\n"])
def test_the_lock_holder_is_read_from_what_dnf_or_yum_says(said: str) -> None:
    held = patching.lock_held(CommandResult(host="h", argv=("dnf",), exit_code=200, stderr=said))
    assert held is not None and held.endswith("7154") and "dnf-automatic" not in held  # matched words only
    assert patching.lock_held(CommandResult(host="h", argv=("dnf",), exit_code=200)) is not None
    assert patching.lock_held(CommandResult(host="h", argv=("dnf",), exit_code=1, stderr="Error: no repo")) is None
    assert patching.lock_held(CommandResult(host="h", argv=("dnf",), exit_code=0, stdout=said)) is None


def test_an_update_waits_for_another_dnf_run_holding_the_lock_then_runs() -> None:
    shell, clock, state = setup()
    state.lock_held_for = 3  # dnf-automatic finishes after three asks
    res = patching.apply_updates(shell, "hv1", HostPolicy(package_lock_wait_s=60), sleep=clock.sleep)
    assert res.exit_code == 0 and state.installed["openssl"] == "1:3.0.7-27.el9"
    assert clock.sleeps == [patching.LOCK_POLL_S] * 3
    assert sum("update" in line for line in state.log) == 4
    assert res.lock_waits == ("RPMDB already locked by 4242",) * 3  # in the update's audit record


@pytest.mark.parametrize("wait_s", [0, 35])
def test_an_update_whose_lock_never_frees_fails_naming_its_holder_and_changes_nothing(wait_s: float) -> None:
    shell, clock, state = setup()
    state.lock_held_for = 100
    before = dict(state.installed)
    with pytest.raises(StepError, match=r"package manager is busy: dnf: RPMDB already locked by 4242 .*changed "
                                        r"no package") as err:
        patching.apply_updates(shell, "hv1", HostPolicy(package_lock_wait_s=wait_s), sleep=clock.sleep)
    assert err.value.step == "update" and "hv1" in str(err.value)
    assert clock.sleeps == [patching.LOCK_POLL_S] * int(wait_s // patching.LOCK_POLL_S)
    assert state.installed == before


def test_preflight_waits_for_the_metadata_lock_too() -> None:
    shell, _, state = setup()
    state.lock_held_for = 100
    with pytest.raises(StepError, match="metadata already locked by 4242"):
        patching.preflight(shell, "hv1", HostPolicy(package_lock_wait_s=0))


def test_lock_words_in_the_output_of_an_otherwise_failed_update_are_no_lock() -> None:
    # a scriptlet (or a repository's message) printing dnf's lock words in a transaction that failed:
    # read as "busy", the update was run again every 10 s and reported as having changed no package
    said = "Running scriptlet: evil-1.0\nRPMDB already locked by 1\nError: Transaction failed\n"
    shell = HandlerShell(lambda argv: (1, said, "") if "update" in argv else (0, "", ""))
    clock = FakeClock()
    with pytest.raises(StepError, match=r"dnf update failed \(exit 1\)") as err:
        patching.apply_updates(shell, "hv1", HostPolicy(package_lock_wait_s=60), sleep=clock.sleep)
    assert "changed no package" not in str(err.value)
    assert clock.sleeps == [] and sum("update" in argv for argv in shell.ran) == 1


def test_the_lock_holder_is_logged_as_data(caplog: pytest.LogCaptureFixture) -> None:
    said = "Existing lock /var/run/\x1b[2J\x1b]8;;http://evil\x07yum.pid: another copy is running as pid 7\n"
    answers = iter([(200, "", said), (0, "Complete!\n", "")])
    shell = HandlerShell(lambda argv: next(answers) if "update" in argv else (0, "", ""))
    clock = FakeClock()
    with caplog.at_level("INFO", logger="hostmaint"):
        res = patching.apply_updates(shell, "hv1", HostPolicy(package_lock_wait_s=60), sleep=clock.sleep)
    assert res.lock_waits == (said.strip().removesuffix("."),)  # the audit keeps the exact words
    [line] = [r.getMessage() for r in caplog.records if "asking again" in r.getMessage()]
    assert "\x1b" not in line and "\\x1b[2J" in line


@pytest.mark.parametrize("said", [
    f"{K1}.x86_64\nhv1: verify: all checks passed\n",  # a second line forging a log line
    f"{K1}.x86_64 /boot/../x\n",  # output that looks like another field
    f"{K1}\x1b[2J.x86_64\n",  # an escape sequence inside one word
    f"{K1}\u202e.x86_64\n",
])
def test_a_running_kernel_that_is_not_one_release_is_refused_and_fails_verify(said: str) -> None:
    # under reboot: never, such a "running kernel" older than the installed one passed verify with a
    # warning quoting it whole into the run's log
    shell, _, state = setup(make_host(installed={"kernel-core": K2}, commands={"uname -r": [0, said, ""]}))
    with pytest.raises(StepError, match=r"hv1: uname -r: expected one kernel release, got ") as err:
        patching.reboot_decision(shell, "hv1", HostPolicy())
    assert err.value.step == "reboot-decision"
    report = patching.verify_host(shell, FakeHypervisor(CELLS), "hv1", HostPolicy(reboot=RebootPolicy.NEVER),
                                  cells_before=CELLS)
    kernel = {c.name: c for c in report.checks}["kernel"]
    assert not report.ok and not kernel.ok and not kernel.warning and "expected one kernel release" in kernel.detail


def test_an_installed_kernel_line_with_control_characters_is_no_kernel() -> None:
    listed = f"{K1}.x86_64\n{K2}\x1b]8;;http://evil\x07.x86_64\n"
    shell, _, _ = setup(make_host(commands={RPM_KERNELS: [0, listed, ""]}))
    with pytest.raises(StepError, match=r"unexpected output line '5\.14\.0-427\.el9\\x1b\]8;;http://evil\\x07"):
        patching.installed_kernels(shell, "hv1")


def test_package_versions_a_host_spells_with_non_ascii_digits_are_compared_without_crashing() -> None:
    # "²".isdigit() is True and int("²") a ValueError: it escaped installed_packages, naming no host
    assert rpm_version.split_evr("²:1.0-1") == (0, "1.0", "1")
    assert rpm_version.evr_compare("1:1.0-1", "²:9.0-1") == 1
    assert rpm_version.rpmvercmp("1²", "12") == -1  # "²" is no digit of a version, as in rpm
    listed = "kernel-core.x86_64\t²:5.14.0-1.el9\nkernel-core.x86_64\t0:5.14.0-2.el9\n"
    shell = HandlerShell(lambda argv: (0, listed, ""))
    assert patching.installed_packages(shell, "hv1") == {"kernel-core.x86_64": "²:5.14.0-1.el9, 0:5.14.0-2.el9"}


def test_megabytes_of_output_are_quoted_by_their_end_with_passwords_masked() -> None:
    # one line of 5 MB on a failed command's stderr became a 5 MB error: the host's state reason, its
    # audit record, the run report and its log line
    tail = "y" * (patching.SAID_KEPT - 10)  # the kept end begins inside the URL before it
    error = "x" * 5_000_000 + " https://svc:hunter2@repo.example/el9/ " + tail
    shell, _, _ = setup(make_host(repo_error=error))
    with pytest.raises(StepError) as err:
        patching.preflight(shell, "hv1", HostPolicy())
    message = str(err.value)
    assert len(message) < patching.SAID_KEPT + 300 and message.endswith(tail)
    assert "characters before)" in message and "hunter2" not in message and "r2@repo" not in message


def test_a_host_printing_a_huge_word_where_a_name_or_release_belongs_is_refused_in_a_short_message() -> None:
    # 300,000 digits are one word of a kernel release's characters: taken as the boot default (grubby) or the
    # machine's name (uname -n), and then quoted whole into the reboot decision, the verify detail and errors
    huge = "5" * 300_000
    shell, _, _ = setup(make_host(commands={"grubby --default-kernel": [0, f"/boot/vmlinuz-{huge}\n", ""],
                                            "uname -n": [0, f"hv1{huge}\n", ""], "uname -r": [0, f"{huge}\n", ""]}))
    for read in (patching.boot_kernel, patching.running_kernel, patching.nodename):
        with pytest.raises(StepError) as err:
            read(shell, "hv1")
        assert str(err.value).startswith("hv1: ") and len(str(err.value)) < patching.SAID_KEPT + 300, read
    assert patching.canonical_name(HandlerShell(lambda argv: (0, f"{huge}.example\n", "")), "hv1") is None


def test_a_thousand_failed_units_are_named_by_the_first_twenty() -> None:
    units = "".join(f"unit-{i}.service loaded failed failed x\n" for i in range(1000))
    shell, _, _ = setup(make_host(commands={"systemctl --failed --no-legend --plain": [0, units, ""]}))
    check = patching.check_systemd(shell, "hv1")
    assert not check.ok and "unit-0.service" in check.detail and "unit-19.service" in check.detail
    assert "unit-20.service" not in check.detail and check.detail.endswith(" and 980 more")
