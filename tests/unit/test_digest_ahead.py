"""A large snapshot's digest computed by a forked child while the parent plans (FleetSnapshot.start_digest).

The forking runs in a fresh interpreter: pytest's process may hold other threads (then, rightly,
nothing is forked), and a child must be observable (its pid, whether it was reaped)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from hostmaint import models
from hostmaint.placement.synthetic import generate_fleet

_PRELUDE = """
import json, os, threading, time, gc
from hostmaint import models
from hostmaint.bulk import Forked
from hostmaint.placement.synthetic import generate_fleet

def reaped(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False

out = {}
"""


def _run(body: str) -> dict[str, object]:
    script = _PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_child_gives_the_digest_the_parent_would_compute() -> None:
    out = _run("""
        snap = generate_fleet(3, 12)
        snap.start_digest(at_least_vms=1)
        ahead = models._DIGESTS_AHEAD.get(id(snap))
        out["forked"] = ahead is not None
        pid = ahead._pid
        out["digest"] = snap.digest()
        out["here"] = snap._digest_here()
        out["copy"] = snap.model_copy().digest()  # a new object: computed in this process
        out["reaped"] = reaped(pid)
        out["left"] = id(snap) in models._DIGESTS_AHEAD
    """)
    assert out["forked"] is True
    assert out["digest"] == out["here"] == out["copy"]
    assert out["reaped"] is True and out["left"] is False


def test_a_small_snapshot_or_a_known_digest_forks_nothing() -> None:
    out = _run("""
        snap = generate_fleet(3, 12)
        snap.start_digest()  # below the default 5,000 VMs
        out["small"] = id(snap) in models._DIGESTS_AHEAD
        snap.digest()
        snap.start_digest(at_least_vms=1)
        out["known"] = id(snap) in models._DIGESTS_AHEAD
    """)
    assert out == {"small": False, "known": False}


def test_a_failed_or_wrong_child_leaves_the_digest_to_the_parent() -> None:
    out = _run("""
        snap = generate_fleet(4, 10)
        right = snap.model_copy().digest()
        for name, work in [("raises", lambda: 1 / 0), ("nonsense", lambda: b"not a digest"),
                           ("exits", lambda: os._exit(0)), ("killed", lambda: os.kill(os.getpid(), 9))]:
            fresh = snap.model_copy()
            models._DIGESTS_AHEAD[id(fresh)] = Forked.start(work)
            out[name] = fresh.digest() == right
    """)
    assert out == {"raises": True, "nonsense": True, "exits": True, "killed": True}


def test_the_answer_may_be_larger_than_a_pipe_holds() -> None:
    out = _run("""
        big = bytes(range(256)) * 4096  # 1 MiB: the child blocks on the pipe until the parent reads
        out["same"] = Forked.start(lambda: big).result() == big
        out["failed"] = Forked.start(lambda: 1 / 0).result()
    """)
    assert out == {"same": True, "failed": None}


def test_no_fork_while_another_thread_runs() -> None:
    out = _run("""
        stop = threading.Event()
        worker = threading.Thread(target=stop.wait)
        worker.start()
        out["with_thread"] = Forked.start(lambda: b"x") is None
        snap = generate_fleet(3, 12)
        snap.start_digest(at_least_vms=1)
        out["ahead"] = id(snap) in models._DIGESTS_AHEAD
        out["digest"] = snap.digest() == snap._digest_here()
        stop.set()
        worker.join()
        alone = Forked.start(lambda: b"x")
        out["alone"] = alone is not None and alone.result() == b"x"
    """)
    assert out == {"with_thread": True, "ahead": False, "digest": True, "alone": True}


def test_a_snapshot_dropped_first_stops_and_reaps_its_child() -> None:
    out = _run("""
        snap = generate_fleet(3, 12)
        # a child that would run long: the snapshot goes before its digest is asked
        models._DIGESTS_AHEAD[id(snap)] = slow = Forked.start(lambda: time.sleep(60) or b"")
        import weakref
        weakref.finalize(snap, models._cancel_ahead, id(snap))
        pid = slow._pid
        started = time.monotonic()
        del snap
        gc.collect()
        out["reaped"] = reaped(pid)
        out["quick"] = time.monotonic() - started < 10
        out["left"] = len(models._DIGESTS_AHEAD)
    """)
    assert out == {"reaped": True, "quick": True, "left": 0}


def test_in_this_process_the_digest_is_right_either_way() -> None:
    # pytest's process may or may not fork (its threads): the value is the same either way
    snap = generate_fleet(5, 10)
    snap.start_digest(at_least_vms=1)
    assert snap.digest() == snap.model_copy().digest()
    assert id(snap) not in models._DIGESTS_AHEAD


def test_the_cli_names_a_large_snapshots_digest_as_the_library_computes_it(tmp_path: Path) -> None:
    # the real command on a snapshot past the fork's threshold (>= 5,000 VMs): whether or not its child
    # computed the digest, the plan names the one the library computes here
    from hostmaint.fleet import dump_snapshot, load_snapshot

    snap = generate_fleet(1, 260, fill=(0.5, 0.8))
    assert len(snap.vms) >= 5000
    path = tmp_path / "large.json"
    path.write_text(dump_snapshot(snap))
    drained = snap.hosts[0].name
    done = subprocess.run([sys.executable, "-m", "hostmaint_cli", "plan", "drain", drained, "--snapshot",
                           str(path), "--json"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode in (0, 1), done.stderr
    plan = json.loads(done.stdout)
    assert plan["snapshot_digest"] == load_snapshot(path).digest() == snap.digest()
    assert plan["hosts"] == [drained]


def test_a_child_that_gives_no_answer_in_time_is_stopped_and_reaped() -> None:
    out = _run("""
        stuck = Forked.start(lambda: time.sleep(60) or b"late")
        pid = stuck._pid
        started = time.monotonic()
        out["answer"] = stuck.result(timeout_s=0.5)
        out["quick"] = time.monotonic() - started < 10
        out["reaped"] = reaped(pid)
    """)
    assert out == {"answer": None, "quick": True, "reaped": True}
