"""Sharding, locks, atomic outputs, failures and resume: the batch and training contract."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from tubcli.errors import TubError
from tubcli.runs import ItemLock, changed_settings, environment_record, parse_shard, shard_items
from tubcli.testing import invoke


def test_shards_partition_any_list_exactly():
    rng = random.Random(0)
    for _ in range(200):
        items = [f"slide_{rng.randrange(1000)}" for _ in range(rng.randrange(0, 60))]
        n = rng.randrange(1, 9)
        shards = [shard_items(items, i, n) for i in range(n)]
        flat = [x for s in shards for x in s]
        assert sorted(flat) == sorted(set(items)) and len(flat) == len(set(items))


def test_shard_from_slurm_and_flags():
    assert parse_shard("2/5") == (2, 5)
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}) == (3, 4)
    assert parse_shard(None, {}) == (0, 1)
    for bad in ("5/5", "a/b", "1", "", " "):  # empty: `--shard "$SHARD"` with SHARD unset
        with pytest.raises(TubError):
            parse_shard(bad)
    # --array=0-4:2 runs tasks 0, 2, 4: shards 0, 1, 2 of 3
    stepped = {"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert [parse_shard(None, {**stepped, "SLURM_ARRAY_TASK_ID": t}) for t in ("0", "2", "4")] == [(0, 3), (1, 3), (2, 3)]
    with pytest.raises(TubError, match="not integers"):
        parse_shard(None, {"SLURM_ARRAY_TASK_ID": "abc", "SLURM_ARRAY_TASK_COUNT": "3"})


def test_item_lock_is_exclusive_and_stale_locks_are_taken(tmp_path):
    out = tmp_path / "a.h5"
    first, second = ItemLock(out), ItemLock(out)
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    Path(str(out) + ".lock").write_text(f"{os.uname().nodename} 999999999\n")  # a dead process's lock
    assert ItemLock(out).acquire()
    empty = Path(str(out) + ".lock")
    empty.write_text("")  # an exclusive create killed before its write (other file systems, older tub)
    assert not ItemLock(out).acquire()  # could still be a live owner about to write
    os.utime(empty, (time.time() - 120, time.time() - 120))
    assert ItemLock(out).acquire()


def test_a_lock_naming_this_process_that_it_did_not_take_is_stale(tmp_path):
    """A container restarted under the same host name can give tub the pid of the killed run (PID 1 in a
    pod): its lock read as a live job, the item was skipped and the run ended without DONE."""
    import socket

    out = tmp_path / "a.h5"
    Path(str(out) + ".lock").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    mine = ItemLock(out)
    assert mine.acquire()
    assert not ItemLock(out).acquire()  # the lock this process took stays its own
    mine.release()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_lock_of_a_killed_job_not_yet_reaped_is_stale(tmp_path):
    """After kill -9 a rerun was refused while the dead job's parent had not reaped it (a zombie answers
    os.kill(pid, 0)): forever under a script that never waits for its children."""
    import socket

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while time.time() < deadline and not Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1].startswith("Z"):
        time.sleep(0.05)  # exited, not waited for: a zombie
    out = tmp_path / "a.h5"
    Path(str(out) + ".lock").write_text(f"{socket.gethostname()} {child.pid}\n")
    try:
        lock = ItemLock(out)
        assert lock.acquire()
        lock.release()
    finally:
        child.wait()


def test_a_lock_from_another_host_is_a_lease_taken_over_when_no_one_refreshes_it(tmp_path):
    """A job killed on another node (node failure, requeue elsewhere) left a lock that no rerun could prove
    stale: the item was skipped and the run ended without it, exit 0. Holders now refresh their locks, and
    one from another host untouched for LEASE_EXPIRES is taken over."""
    out = tmp_path / "a.h5"
    path = Path(str(out) + ".lock")
    path.write_text("othernode 12345\n")
    assert not ItemLock(out).acquire()  # a live job there, as far as anyone can tell
    old = time.time() - ItemLock.LEASE_EXPIRES - 60
    os.utime(path, (old, old))
    lock = ItemLock(out)
    assert lock.acquire() and lock.owner().split()[1] == str(os.getpid())
    os.utime(path, (old, old))  # ... and this process's own lease is kept alive by its refresher
    ItemLock.refresh_held()
    assert time.time() - path.stat().st_mtime < 60
    lock.release()
    assert path not in ItemLock._held
    lock = ItemLock(out)  # suspended past its lease: another job took the item over; its lock stays
    assert lock.acquire()
    path.write_text("othernode 999\n")
    lock.release()
    assert path.read_text() == "othernode 999\n" and not lock.held


def test_taking_a_lock_never_writes_through_a_planted_link(tmp_path):
    """In a group-writable folder another user could plant links at the names a lock's private owner file
    would take; the write must never reach their target."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "a.h5"
    for pid in range(os.getpid() - 50, os.getpid() + 50):  # the old predictable names (`.{lock}.{pid}`)
        (tmp_path / f".a.h5.lock.{pid}").symlink_to(victim)
    lock = ItemLock(out)
    assert lock.acquire()
    assert victim.read_text() == "keep me" and lock.owner().split()[1] == str(os.getpid())
    assert oct(Path(str(out) + ".lock").stat().st_mode & 0o777) == oct(0o644)  # other jobs read the owner
    lock.release()


def test_a_job_killed_while_taking_its_lock_never_blocks_the_item(tmp_path):
    # a SLURM kill can land at any instruction; the lock it leaves must always be provably stale
    out = tmp_path / "a.h5"
    loop = ("import sys; from tubcli.runs import ItemLock\n"
            "lock = ItemLock(sys.argv[1]); print('go', flush=True)\n"
            "while True:\n    lock.acquire(); lock.release()\n")
    rng = random.Random(1)
    for _ in range(15):
        proc = subprocess.Popen([sys.executable, "-c", loop, str(out)], stdout=subprocess.PIPE)
        proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.05))
        proc.kill()
        proc.wait()
        lock = ItemLock(out)
        assert lock.acquire(), Path(str(out) + ".lock").read_bytes()
        lock.release()


def test_two_jobs_finding_one_stale_lock_never_both_take_it(tmp_path, monkeypatch):
    """Job B found a dead job's lock stale; before B removed it, job A removed it and made its own. B then
    removed A's live lock and both processed the item (4 of 30 trials with 8 processes). The stale lock is
    now re-checked under a ``.break`` guard before it goes."""
    out = tmp_path / "a.h5"
    path = Path(str(out) + ".lock")
    path.write_text(f"{os.uname().nodename} 999999999\n")  # a dead process's lock
    first, second = ItemLock(out), ItemLock(out)
    real_stale = ItemLock._stale
    calls = []

    def stale_then_first_takes_it(path_):
        found = real_stale(path_)
        if not calls:
            calls.append(found)
            assert first.acquire()  # A takes the stale lock over between B's look and B's removal
        return found

    monkeypatch.setattr(second, "_stale", stale_then_first_takes_it)
    assert not second.acquire()
    assert calls == [True] and first.held and path.exists()
    assert not Path(str(path) + ".break").exists()
    first.release()
    Path(str(path) + ".break").write_text(f"{os.uname().nodename} 999999999\n")  # a breaker killed midway
    path.write_text(f"{os.uname().nodename} 999999999\n")
    assert ItemLock(out).acquire()  # the dead breaker's guard is stale too


def test_done_waits_for_items_another_job_holds(toy_plugins, tmp_path):
    inputs = make_inputs(tmp_path / "in", 3)
    out = tmp_path / "run"
    held = ItemLock(out / "outputs" / "item001.txt")
    assert held.acquire()  # a live job (this one) is working on item001
    result = invoke(["toy", "evaluate", *map(str, inputs), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "outputs").glob("*.txt")) == ["item000.txt", "item002.txt"]
    assert not (out / "DONE").exists() and "locked by another job" in result.output
    held.release()
    result = invoke(["toy", "evaluate", *map(str, inputs), "-o", str(out)])
    assert result.exit_code == 0 and (out / "DONE").exists()
    assert len(list((out / "outputs").glob("*.txt"))) == 3


def test_only_a_training_makes_an_empty_checkpoints_folder(toy_plugins, tmp_path):
    """An evaluate run has no checkpoints; an empty folder of that name made users look for missing weights."""
    from tubcli.config import TubConfig
    from tubcli.runs import Run

    inputs = make_inputs(tmp_path / "in", 2)
    result = invoke(["toy", "evaluate", *map(str, inputs), "-o", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ev" / "DONE").exists() and not (tmp_path / "ev" / "checkpoints").exists()
    Run("toy", "train", TubConfig(), out=tmp_path / "tr", training=True).finish({})
    assert (tmp_path / "tr" / "checkpoints").is_dir()


def make_inputs(folder: Path, n: int, bad: tuple = ()) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"item{i:03d}.txt"
        p.write_text("oops" if i in bad else str(i))
        paths.append(p)
    return paths


def test_an_input_whose_output_name_is_too_long_fails_alone(toy_plugins, tmp_path):
    """A name legal on disk (245 bytes) whose lock/temporary names would not be: that item fails with a
    one-line reason, the others are processed (it used to abort the batch with a raw OSError)."""
    inputs = make_inputs(tmp_path / "in", 2)
    long = tmp_path / "in" / ("s" * 241 + ".txt")
    long.write_text("3")
    out = tmp_path / "run"
    result = invoke(["toy", "evaluate", *inputs, long, "-o", out, "--json"])
    assert result.exit_code == 1 and json.loads(result.stdout)["squared"] == 2
    fails = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert len(fails) == 1 and "is 245 bytes; at most 239 fit" in fails[0]["error"]


def test_batch_skips_existing_and_reports_failures(toy_plugins, tmp_path):
    inputs = make_inputs(tmp_path / "in", 6, bad=(2,))
    out = tmp_path / "run"
    result = invoke(["toy", "evaluate", *inputs, "-o", out, "--json"])
    assert result.exit_code == 1 and "1 of 6 items failed" in result.stderr
    # the other items' results are kept: on stdout and in metrics.json, not just the batch counts
    printed = json.loads(result.stdout)
    assert printed["squared"] == 5 and printed["batch"]["failed"] == 1
    assert json.loads((out / "metrics.json").read_text()) == printed
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [Path(f["item"]).name for f in failures] == ["item002.txt"] and "ValueError" in failures[0]["error"]
    assert sorted(p.name for p in (out / "outputs").glob("*.txt")) == [f"item{i:03d}.txt" for i in (0, 1, 3, 4, 5)]
    assert (out / "outputs" / "item003.txt").read_text().splitlines()[0] == "9.0"
    assert not (out / "DONE").exists()
    (inputs[2]).write_text("2")
    result = invoke(["toy", "evaluate", *inputs, "-o", out, "--json"])
    assert result.exit_code == 0
    batch = json.loads(result.stdout)["batch"]
    assert batch["processed"] == 1 and batch["skipped_existing"] == 5 and (out / "DONE").exists()
    assert not (out / "failures.jsonl").exists()  # the item that failed before has succeeded now


def test_a_retry_drops_only_the_failures_that_now_succeed(toy_plugins, tmp_path):
    inputs = make_inputs(tmp_path / "in", 4, bad=(1, 2))
    out = tmp_path / "run"
    assert invoke(["toy", "evaluate", *inputs, "-o", out]).exit_code == 1
    inputs[1].write_text("1")
    assert invoke(["toy", "evaluate", *inputs, "-o", out]).exit_code == 1
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [Path(f["item"]).name for f in failures] == ["item002.txt"]  # still failed, listed once
    assert not list(out.glob("*.lock")) and not list(tmp_path.glob(".*.lock"))


def test_shards_keep_their_own_metrics(toy_plugins, tmp_path):
    inputs = make_inputs(tmp_path / "in", 5)
    out = tmp_path / "run"
    for i in range(2):
        assert invoke(["toy", "evaluate", *inputs, "--shard", f"{i}/2", "-o", out]).exit_code == 0
    shards = json.loads((out / "metrics.json").read_text())["shards"]
    assert {k: v["squared"] for k, v in shards.items()} == {"0/2": 3, "1/2": 2}
    assert invoke(["toy", "evaluate", *inputs, "--shard", "1/2", "-o", out]).exit_code == 0  # all skipped now
    shards = json.loads((out / "metrics.json").read_text())["shards"]
    assert shards["0/2"]["squared"] == 3 and shards["1/2"]["batch"]["skipped_existing"] == 2


def test_a_shard_that_fails_on_a_rerun_is_not_marked_done(toy_plugins, tmp_path):
    inputs = make_inputs(tmp_path / "in", 4)
    out = tmp_path / "run"
    assert invoke(["toy", "evaluate", *inputs, "--shard", "0/2", "-o", out]).exit_code == 0
    assert (out / "DONE.0of2").exists()
    inputs[0].write_text("oops")
    assert invoke(["toy", "evaluate", *inputs, "--shard", "0/2", "--overwrite", "-o", out]).exit_code == 1
    assert not (out / "DONE.0of2").exists()


def test_one_training_job_per_run_directory(tmp_path):
    from tubcli.config import TubConfig
    from tubcli.runs import Run

    first = Run("toy", "train", TubConfig(), out=tmp_path / "r", training=True)
    with pytest.raises(TubError, match="another job is training in"):
        Run("toy", "train", TubConfig(), out=tmp_path / "r", training=True)
    first.finish({})
    Run("toy", "train", TubConfig(), out=tmp_path / "r", training=True).finish({})


def test_one_job_per_run_directory_that_a_verb_continues(tmp_path):
    """Two `mlff md` jobs on one -o (a script submitted twice) both ran and wrote every step twice into one
    trajectory; a verb that continues its outputs now takes the directory's lock as training does."""
    from tubcli.config import TubConfig
    from tubcli.runs import Run

    first = Run("toy", "md", TubConfig(), out=tmp_path / "r", continues=True)
    with pytest.raises(TubError, match="another job is running toy md in"):
        Run("toy", "md", TubConfig(), out=tmp_path / "r", continues=True)
    first.finish({})
    Run("toy", "md", TubConfig(), out=tmp_path / "r", continues=True).finish({})
    Run("toy", "evaluate", TubConfig(), out=tmp_path / "e")  # a batch verb locks its items, not the directory
    Run("toy", "evaluate", TubConfig(), out=tmp_path / "e").finish({})


def test_shards_cover_all_items_once(toy_plugins, tmp_path):
    inputs = make_inputs(tmp_path / "in", 7)
    out = tmp_path / "run"
    for i in range(3):
        assert invoke(["toy", "evaluate", *inputs, "-o", out, "--shard", f"{i}/3"]).exit_code == 0
    assert len(list((out / "outputs").glob("*.txt"))) == 7
    assert sorted(p.name for p in out.glob("DONE*")) == ["DONE.0of3", "DONE.1of3", "DONE.2of3"]
    assert invoke(["toy", "evaluate", *inputs, "-o", out]).exit_code == 0  # a whole run after the shards
    assert sorted(p.name for p in out.glob("DONE*")) == ["DONE"]  # their markers are stale now


def toy_cli(args, env):
    return [sys.executable, "-m", "tub_toy.run_cli", *map(str, args)]


def test_two_processes_on_one_folder_never_share_an_item(toy_env, tmp_path):
    inputs = make_inputs(tmp_path / "in", 12)
    log = tmp_path / "processed.log"
    env = {**toy_env, "TOY_PROCESSED_LOG": str(log), "TOY_SLOW": "0.02"}
    args = ["toy", "evaluate", *inputs, "-o", tmp_path / "run", "-q"]
    procs = [subprocess.Popen(toy_cli(args, env), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        p.communicate(timeout=120)
        assert p.returncode == 0
    names = log.read_text().split()
    assert sorted(names) == sorted(p.name for p in inputs)  # every item exactly once
    assert len(list((tmp_path / "run" / "outputs").glob("*.txt"))) == 12


def test_results_into_a_closed_pipe_end_quietly(toy_env, tmp_path):
    inputs = make_inputs(tmp_path / "in", 3)
    env = {**toy_env, "TOY_SLOW": "0.05"}
    proc = subprocess.Popen(toy_cli(["toy", "evaluate", *inputs, "-o", tmp_path / "run", "--json"], env), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `tub ... | head -0`: the reader is gone before the results come
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, stderr
    assert "error" not in stderr and "Broken pipe" not in stderr
    assert (tmp_path / "run" / "DONE").exists()


def test_failed_items_keep_exit_1_when_the_reader_closed_the_pipe(toy_env, tmp_path):
    """`tub ... | head` under pipefail: a closed pipe is not an error, but failed items still are."""
    inputs = make_inputs(tmp_path / "in", 3, bad=(1,))
    env = {**toy_env, "TOY_SLOW": "0.05"}
    proc = subprocess.Popen(toy_cli(["toy", "evaluate", *inputs, "-o", tmp_path / "run", "--json"], env), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1, stderr
    assert "1 of 3 items failed" in stderr


def _stopped_after_two_items(toy_env, tmp_path, sig):
    """A slow 20-item batch run sent ``sig`` once two outputs exist: (process, run dir, inputs, env)."""
    inputs = make_inputs(tmp_path / "in", 20)
    env = {**toy_env, "TOY_SLOW": "0.05"}
    out = tmp_path / "run"
    proc = subprocess.Popen(toy_cli(["toy", "evaluate", *inputs, "-o", out, "-q"], env), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / "outputs").glob("item*.txt"))) < 2:
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc, out, inputs, env


def test_killed_run_leaves_nothing_that_looks_complete(toy_env, tmp_path):
    proc, out, inputs, env = _stopped_after_two_items(toy_env, tmp_path, signal.SIGKILL)
    proc.wait()
    assert not (out / "DONE").exists()
    finished = list((out / "outputs").glob("item*.txt"))
    assert 2 <= len(finished) < 20
    for path in finished:
        assert path.read_text().endswith("end\n")  # every output under its final name is complete
    # a rerun finishes the rest (the dead process's lock is stale) and writes DONE
    result = subprocess.run(toy_cli(["toy", "evaluate", *inputs, "-o", out, "-q"], env), env={**env, "TOY_SLOW": "0"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(list((out / "outputs").glob("item*.txt"))) == 20 and (out / "DONE").exists()
    assert not list((out / "outputs").glob(".tmp-*"))  # the killed job's partial output is gone


def test_sigterm_releases_the_item_locks_and_exits_143(toy_env, tmp_path):
    """A batch system's time limit (SIGTERM) unwinds like Ctrl-C: no lock is left that a rerun on another
    node would take for a live job (and skip), no temporary output, no DONE."""
    proc, out, _, _ = _stopped_after_two_items(toy_env, tmp_path, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stderr.decode().strip().splitlines()[-1].startswith("error: terminated (SIGTERM)")
    assert not list((out / "outputs").glob("*.lock")) and not list((out / "outputs").glob(".tmp-*"))
    assert not (out / "DONE").exists()
    # tub.log says how the run ended (it stopped at the last progress line: a killed job read as a running one)
    assert (out / "tub.log").read_text().splitlines()[-1].endswith("ERROR stopped: terminated (SIGTERM)")
    assert stderr.decode().count("terminated") == 1  # the terminal gets its one line, not a second


@pytest.mark.parametrize("verb, then", [
    ("evaluate", "rerun with the same -o to continue where it stopped"),
    ("train", "rerun with the same -o and --resume auto to continue from its last checkpoint"),
    ("explain", "'explain' keeps no partial result; rerun it to start over")])
def test_a_stopped_run_is_told_what_a_rerun_does(toy_plugins, tmp_path, monkeypatch, verb, then):
    """Every verb said 'rerun with the same -o to continue where it stopped', also those that start over
    (a 6-minute pathorob evaluate stopped after its first metric recomputed it)."""
    import tub_toy.verbs

    def stopped(cfg, run):
        raise KeyboardInterrupt

    monkeypatch.setattr(tub_toy.verbs, verb, stopped)
    data = tmp_path / "x.txt"
    data.write_text("3\n")
    result = invoke(["toy", verb, data, "-o", tmp_path / "run"])
    assert result.exit_code == 130 and result.stderr.strip().splitlines()[-1] == f"error: interrupted; {then}"


def test_sigterm_reworded_by_a_c_extension_still_exits_143_and_fails_no_item(toy_env, tmp_path):
    """SIGTERM that lands inside h5py or torch.save surfaces as their SystemError/RuntimeError: it was an
    item's failure (and the batch went on) or 'error: RuntimeError' with exit 1, which a requeue-on-143
    wrapper takes for a crash."""
    proc, out, _, _ = _stopped_after_two_items({**toy_env, "TOY_REWORD_SIGNALS": "1"}, tmp_path, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stderr.decode().strip().splitlines()[-1].startswith("error: terminated (SIGTERM)")
    assert not (out / "failures.jsonl").exists() and not (out / "DONE").exists()
    assert (out / "tub.log").read_text().splitlines()[-1].endswith("ERROR stopped: terminated (SIGTERM)")


def test_resume_auto_continues_from_last_epoch(toy_env, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("\n".join(f"{x},{x % 3},{2 * x - (x % 3)}" for x in range(1, 9)))
    common = ["toy", "train", data, "--epochs", "6", "--lr", "0.01", "-q", "--json"]
    full = subprocess.run(toy_cli(common + ["-o", tmp_path / "full"], toy_env), env=toy_env,
                          capture_output=True, text=True, timeout=120)
    assert full.returncode == 0, full.stderr
    killed = subprocess.run(toy_cli(common + ["-o", tmp_path / "killed"], toy_env),
                            env={**toy_env, "TOY_CRASH_AT_EPOCH": "3"}, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 3 and not (tmp_path / "killed" / "DONE").exists()
    resumed = subprocess.run(toy_cli(common + ["-o", tmp_path / "killed", "--resume", "auto"], toy_env),
                             env=toy_env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3, 4, 5]  # 0-2 before the kill, 3-5 after resuming
    assert json.loads(resumed.stdout)["weights"] == json.loads(full.stdout)["weights"]
    assert (tmp_path / "killed" / "DONE").exists()
    late = subprocess.run(toy_cli(common + ["-o", tmp_path / "late"], toy_env),
                          env={**toy_env, "TOY_CRASH_AFTER_LOG": "3"}, capture_output=True, text=True, timeout=120)
    assert late.returncode == 3  # epoch 3 logged, its checkpoint never written
    resumed = subprocess.run(toy_cli(common + ["-o", tmp_path / "late", "--resume", "auto"], toy_env),
                             env=toy_env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "late" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3, 4, 5]  # the orphan row of epoch 3 is dropped, not logged twice


def test_resume_path_must_exist(toy_plugins, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("1,0,2\n")
    result = invoke(["toy", "train", data, "--resume", tmp_path / "nowhere"])
    assert result.exit_code == 2 and "--resume" in result.stderr


def test_atomic_outputs_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    from tubcli.io import atomic_path, write_text

    old = os.umask(0o022)
    try:
        out = write_text(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "d.out") as tmp:
            tmp.unlink()
            tmp.mkdir()
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d.out").stat().st_mode & 0o777 == 0o755


def test_a_writer_that_rewords_a_full_disk_gives_the_full_disk_error(tmp_path, monkeypatch):
    """torch.save on a full disk says "unexpected pos 926912 vs 926800" and safetensors "I/O error: ... (os
    error 28)": a training's checkpoint on a full quota read as a crash. atomic_path asks the folder and
    raises the OSError that os_error_hint turns into "no space left"; a writer's own bug stays as it is."""
    import errno

    from tubcli import io
    from tubcli.verbs import os_error_hint

    def torch_like(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 926912 vs 926800")

    def full_fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(io.os, "fsync", full_fsync)
        with pytest.raises(OSError) as caught:
            with io.atomic_path(tmp_path / "last.pt") as tmp:
                torch_like(tmp)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "last.pt")
    assert os_error_hint(caught.value).startswith("no space left on the device or quota exceeded")
    with pytest.raises(OSError) as caught:
        with io.atomic_path(tmp_path / "w.safetensors"):
            raise RuntimeError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")
    assert caught.value.errno == errno.EDQUOT
    with pytest.raises(RuntimeError, match="unexpected pos"):  # the folder takes writes: not a full disk
        with io.atomic_path(tmp_path / "last.pt") as tmp:
            torch_like(tmp)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary or probe left


def test_stale_temporaries_of_exactly_one_output_are_removed(tmp_path):
    from tubcli.io import atomic_path, remove_stale_temporaries

    names = [".tmp-a-abc_1234.txt", ".tmp-a-b-abc_1234.txt", ".tmp-ab-abc_1234.txt", ".tmp-a-abc_1234.csv"]
    for name in names:
        (tmp_path / name).write_text("partial")
    (tmp_path / ".tmp-a-dir_5678.txt").mkdir()  # a directory output's temporary
    assert remove_stale_temporaries(tmp_path / "a.txt") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
    with atomic_path(tmp_path / "a.txt") as tmp:  # the pattern is the one atomic_path really writes
        assert remove_stale_temporaries(tmp_path / "a.txt") == 1 and not tmp.exists()
        tmp.write_text("x")


def test_json_results_are_strict_json_with_nan_as_null(capsys, tmp_path):
    import numpy as np

    from tubcli.io import read_json, write_json
    from tubcli.verbs import print_results

    metrics = {"r2": float("nan"), "mae": np.float32(0.5), "curve": np.array([1.0, np.inf])}
    print_results(metrics, as_json=True)
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert out == {"r2": None, "mae": 0.5, "curve": [1.0, None]}
    assert read_json(write_json(tmp_path / "m.json", metrics)) == out


def test_default_run_directories_are_created_exclusively(tmp_path):
    from tubcli.runs import new_run_dir

    base = tmp_path / "runs" / "toy" / "evaluate" / "20261127-080000_abc"
    dirs = [new_run_dir(base) for _ in range(3)]  # three runs of one config in the same second
    assert [d.name for d in dirs] == [base.name, base.name + "-2", base.name + "-3"]
    assert all(d.is_dir() for d in dirs)


def test_non_batch_verbs_ignore_slurm_arrays_and_refuse_shard(toy_plugins, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("1,0,2\n0,1,3\n")
    slurm = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    result = invoke(["toy", "train", data, "--epochs", "1", "-o", tmp_path / "r"], env=slurm)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "DONE").exists() and not list((tmp_path / "r").glob("DONE.*"))
    result = invoke(["toy", "train", data, "--epochs", "1", "--shard", "0/2", "-o", tmp_path / "r2"])
    assert result.exit_code == 2 and "--shard applies to batch verbs only" in result.stderr


def test_output_path_that_is_a_file_is_a_one_line_error(toy_plugins, tmp_path):
    target = tmp_path / "afile"
    target.write_text("keep me")
    result = invoke(["toy", "evaluate", *make_inputs(tmp_path / "in", 1), "-o", target])
    assert result.exit_code == 2 and "is a file; pass a directory" in result.stderr
    assert target.read_text() == "keep me"


def test_a_run_that_fails_before_any_output_leaves_no_directory(toy_plugins, tmp_path):
    missing = tmp_path / "in" / "missing.txt"
    result = invoke(["toy", "explain", missing, "-o", tmp_path / "fresh"])
    assert result.exit_code == 2 and not (tmp_path / "fresh").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "notes.txt").write_text("mine")  # a directory the user had: never removed
    result = invoke(["toy", "explain", missing, "-o", tmp_path / "old"])
    assert result.exit_code == 2 and (tmp_path / "old" / "notes.txt").read_text() == "mine"
    done = make_inputs(tmp_path / "ok", 2)  # an earlier, finished run reused by a refused command
    assert invoke(["toy", "evaluate", *done, "-o", tmp_path / "earlier"]).exit_code == 0
    records = {n: (tmp_path / "earlier" / n).read_bytes() for n in ("config.yaml", "DONE")}
    result = invoke(["toy", "explain", missing, "-o", tmp_path / "earlier"])
    assert result.exit_code == 2
    assert {n: (tmp_path / "earlier" / n).read_bytes() for n in records} == records
    bad = make_inputs(tmp_path / "bad", 2, bad=(1,))
    result = invoke(["toy", "evaluate", *bad, "-o", tmp_path / "partial"])
    assert result.exit_code == 1 and (tmp_path / "partial" / "failures.jsonl").exists()  # partial results stay


def test_a_batch_run_directory_refuses_other_settings_and_keeps_their_record(toy_plugins, tmp_path):
    import yaml

    inputs, out = make_inputs(tmp_path / "in", 3), tmp_path / "run"
    assert invoke(["toy", "evaluate", *inputs[:2], "-o", out]).exit_code == 0
    assert invoke(["toy", "evaluate", *inputs, "-o", out]).exit_code == 0  # more inputs, same settings: fine
    result = invoke(["toy", "evaluate", *inputs, "--precision", "fp64", "-o", out])
    assert result.exit_code == 2 and "other settings (precision: fp32 -> fp64)" in result.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["precision"] == "fp32" and (out / "DONE").exists()
    assert invoke(["toy", "evaluate", *inputs, "--precision", "fp64", "--overwrite", "-o", out]).exit_code == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["precision"] == "fp64"
    assert yaml.safe_load((out / "config.1.yaml").read_text())["precision"] == "fp32"
    relative = os.path.relpath(inputs[0])  # only the inputs differ (one spelled relative): no new record
    assert invoke(["toy", "evaluate", relative, *inputs[1:], "--precision", "fp64", "-o", out]).exit_code == 0
    assert not (out / "config.2.yaml").exists()


def test_changed_settings_name_a_left_out_option_as_its_default():
    earlier = {"model": {"pool": None, "arch": "uni2-h"}, "inputs": ["a"], "device": "cpu"}
    now = {"model": {"pool": "cls+mean", "arch": "uni2-h"}, "inputs": ["b"], "device": "cuda"}
    assert changed_settings(earlier, now, {"inputs", "device"}) == "model.pool: (default) -> cls+mean"
    assert changed_settings(now, earlier, {"inputs", "device"}) == "model.pool: cls+mean -> (default)"
    assert changed_settings(earlier, earlier, set()) == ""
    newer = {**now, "model": {**now["model"], "stride": 2}}  # a setting the older record does not have
    assert changed_settings(now, newer, {"inputs", "device"}) == "model.stride: (not recorded) -> 2"


def test_training_into_a_run_with_a_checkpoint_needs_resume_or_overwrite(toy_plugins, tmp_path):
    data, out = tmp_path / "d.csv", tmp_path / "t"
    data.write_text("1,0,2\n0,1,3\n")
    assert invoke(["toy", "train", data, "--epochs", "3", "-o", out]).exit_code == 0
    rows = (out / "metrics.jsonl").read_text().splitlines()
    result = invoke(["toy", "train", data, "--epochs", "2", "-o", out])
    assert result.exit_code == 2 and "--resume auto" in result.stderr
    assert (out / "metrics.jsonl").read_text().splitlines() == rows
    before = {p: p.read_bytes() for p in [*(out / "checkpoints").iterdir(), out / "metrics.jsonl", out / "DONE"]}
    result = invoke(["toy", "train", tmp_path / "missing.csv", "--overwrite", "-o", out])
    assert result.exit_code == 2  # refused before training: the earlier run is left whole
    assert {p: p.read_bytes() for p in before} == before and not (out / ".previous").exists()
    assert invoke(["toy", "train", data, "--epochs", "2", "--overwrite", "-o", out]).exit_code == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # only the new training's rows
    assert not (out / ".previous").exists()


def test_a_resume_continues_the_recorded_training_only(toy_plugins, tmp_path):
    data, out = tmp_path / "d.csv", tmp_path / "t"
    data.write_text("1,0,2\n0,1,3\n")
    assert invoke(["toy", "train", data, "--epochs", "2", "-o", out]).exit_code == 0
    record = (out / "config.yaml").read_text()
    result = invoke(["toy", "train", data, "--epochs", "3", "--lr", "0.5", "-o", out, "--resume", "auto"])
    assert result.exit_code == 2 and "trained with other settings (optim.lr: 0.1 -> 0.5)" in result.stderr
    assert "only epochs may change" in result.stderr and (out / "config.yaml").read_text() == record
    assert invoke(["toy", "train", data, "--epochs", "3", "-o", out, "--resume", "auto"]).exit_code == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    # a run of tub 0.2.0 has no vector_figures in its record: it only changes how plots are saved, so a resume
    # (here with vector figures asked for) continues it
    config = out / "config.yaml"
    config.write_text("".join(ln for ln in config.read_text().splitlines(True) if not ln.startswith("vector_figures")))
    result = invoke(["toy", "train", data, "--epochs", "4", "-o", out, "--resume", "auto", "--set",
                     "vector_figures=pdf"])
    assert result.exit_code == 0, result.stderr
    # --resume PATH into a new -o checks against the checkpoint's own run (there was no record to compare with)
    result = invoke(["toy", "train", data, "--epochs", "5", "--lr", "0.5", "-o", tmp_path / "new", "--resume", out])
    assert result.exit_code == 2 and "that run was trained with other settings (optim.lr: 0.1 -> 0.5)" in result.stderr
    assert not (tmp_path / "new").exists()
    assert invoke(["toy", "train", data, "--epochs", "5", "-o", tmp_path / "new", "--resume", out]).exit_code == 0


def test_resume_auto_without_o_finds_the_run_whose_epochs_were_extended(toy_plugins, tmp_path):
    """`--epochs 3 --resume auto` after `--epochs 2`: epochs may change, but the run directory's name holds the
    hash of the whole config, so the lookup found nothing and silently started a second training."""
    data = tmp_path / "d.csv"
    data.write_text("1,0,2\n0,1,3\n")
    assert invoke(["toy", "train", data, "--epochs", "2"]).exit_code == 0
    (first,) = (tmp_path / "runs" / "toy" / "train").iterdir()
    result = invoke(["toy", "train", data, "--epochs", "3", "--resume", "auto"])
    assert result.exit_code == 0, result.stderr
    assert [p.name for p in (tmp_path / "runs" / "toy" / "train").iterdir()] == [first.name]
    assert len((first / "metrics.jsonl").read_text().splitlines()) == 3 and "resuming from" in result.stderr
    # another lr is another training: nothing to resume, and the log says so
    result = invoke(["toy", "train", data, "--epochs", "3", "--lr", "0.5", "--resume", "auto"])
    assert result.exit_code == 0, result.stderr
    assert "--resume auto: no checkpoint of an earlier run with these settings" in result.stderr
    assert len(list((tmp_path / "runs" / "toy" / "train").iterdir())) == 2


def test_a_training_killed_before_its_first_checkpoint_starts_its_log_over(toy_plugins, tmp_path):
    data, out = tmp_path / "d.csv", tmp_path / "t"
    data.write_text("1,0,2\n0,1,3\n")
    out.mkdir()
    (out / "env.json").write_text("{}")  # the records the killed run wrote when it started
    (out / "metrics.jsonl").write_text('{"epoch": 0, "loss": 9}\n')  # what the killed run logged, no checkpoint
    assert invoke(["toy", "train", data, "--epochs", "2", "-o", out]).exit_code == 0
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_a_run_turns_tf32_off(toy_plugins, tmp_path):
    """fp32 is fp32 on GPUs too: a run switches cuDNN's and cuBLAS's TF32 shortcuts off."""
    import torch

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        data = tmp_path / "d.csv"
        data.write_text("1,0,2\n")
        result = invoke(["toy", "train", data, "--epochs", "1", "-o", tmp_path / "r"])
        assert result.exit_code == 0, result.stderr
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_a_run_imports_torch_only_when_its_verb_does(toy_env, tmp_path):
    """Seeding torch at the start of every run imported it (2-4 s) also for verbs that never use it; the
    seed and the TF32 switch now wait for torch's import and apply right after it."""
    number = tmp_path / "n.txt"
    number.write_text("3\n")
    code = ("import runpy, sys\n"
            "sys.argv = ['tub', 'toy', 'evaluate', sys.argv[1], '-o', sys.argv[2], '--seed', '5', '-q']\n"
            "try:\n    runpy.run_module('tub_toy.run_cli', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "assert 'torch' not in sys.modules\n"
            "import importlib.util\n"
            "assert importlib.util.find_spec('torch') is not None  # a look imports nothing: the hook stays\n"
            "import torch\n"
            "drawn = torch.rand(4)\n"
            "assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False\n"
            "torch.manual_seed(5)\n"
            "assert torch.equal(drawn, torch.rand(4)), 'torch was not seeded with the run seed'\n")
    proc = subprocess.run([sys.executable, "-c", code, str(number), str(tmp_path / "run")], env=toy_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "outputs" / "n.txt").read_text().startswith("9.0")


def test_a_run_directory_belongs_to_one_verb(toy_plugins, tmp_path):
    inputs = make_inputs(tmp_path / "in", 2)
    out = tmp_path / "run"
    assert invoke(["toy", "evaluate", *inputs, "-o", out]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = invoke(["toy", "train", "-o", out])
    assert result.exit_code == 2 and "run directory of `tub toy evaluate`" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # its records untouched
    assert invoke(["toy", "evaluate", *inputs, "-o", out]).exit_code == 0  # the same verb may come back


def test_a_resumed_training_takes_over_a_lock_from_another_host(tmp_path):
    from tubcli.config import TubConfig
    from tubcli.runs import Run

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "training.lock").write_text("othernode 4242\n")  # the job was preempted on another node
    with pytest.raises(TubError, match=r"othernode 4242.*delete .*training.lock"):
        Run("toy", "train", TubConfig(), out=tmp_path / "r", training=True)
    Run("toy", "train", TubConfig(), out=tmp_path / "r", training=True, resume="auto").finish({})
    assert not (tmp_path / "r" / "training.lock").exists()


def test_a_relative_path_is_read_from_the_folder_the_earlier_run_started_in(tmp_path, monkeypatch):
    """A rerun from another folder spells the same file otherwise (`w.bin` from a/, `../a/w.bin` from b/)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"w")
    (tmp_path / "a" / "v.bin").write_bytes(b"v")
    monkeypatch.chdir(tmp_path / "b")
    earlier = {"weights": "w.bin", "models": ["w.bin", "v.bin"]}
    same = {"weights": "../a/w.bin", "models": ["../a/w.bin", str(tmp_path / "a" / "v.bin")]}
    assert changed_settings(earlier, same, set(), earlier_cwd=str(tmp_path / "a")) == ""
    assert changed_settings(earlier, same, set()) != ""  # without the recorded folder: not the same files
    other = {"weights": "../a/v.bin", "models": ["../a/v.bin", "../a/w.bin"]}
    assert changed_settings(earlier, other, set(), earlier_cwd=str(tmp_path / "a")) == \
        "models: ['w.bin', 'v.bin'] -> ['../a/v.bin', '../a/w.bin']; weights: w.bin -> ../a/v.bin"
    assert environment_record()["cwd"] == str(tmp_path / "b")
    (tmp_path / "b" / "w.bin").write_bytes(b"other")  # the same spelling names another file from here
    assert changed_settings(earlier, {"weights": "w.bin", "models": ["../a/w.bin", "../a/v.bin"]}, set(),
                            earlier_cwd=str(tmp_path / "a")) == f"weights: {tmp_path}/a/w.bin -> {tmp_path}/b/w.bin"
    assert changed_settings({"kind": "svm"}, {"kind": "svm"}, set(), earlier_cwd=str(tmp_path / "a")) == ""


def test_a_run_directory_is_never_an_input_nor_inside_an_input_folder(tmp_path):
    """Docs/architecture: no output path may be an input or lie inside an input folder; a tub run directory
    given as a model is tub's own and may hold later runs; an input in the run's outputs could be replaced."""
    from pydantic import BaseModel, Field

    from tubcli.runs import refuse_output_among_inputs

    class Cfg(BaseModel):
        inputs: list[Path] = []
        model: Path | None = None
        output: Path | None = Field(None, json_schema_extra={"output": True})
        kind: str = "svm"  # a setting, not a path, even where a folder of that name exists

    data, model_run = tmp_path / "slides", tmp_path / "train"
    data.mkdir()
    (data / "a.svs").write_bytes(b"x")
    model_run.mkdir()
    for name in ("env.json", "config.yaml"):
        (model_run / name).write_text("{}")
    for out in (data, data / "heatmaps"):
        with pytest.raises(TubError, match="inside the input"):
            refuse_output_among_inputs(Cfg(inputs=[data]), out)
    refuse_output_among_inputs(Cfg(inputs=[data / "a.svs"], model=model_run), model_run / "heatmaps")
    refuse_output_among_inputs(Cfg(inputs=[data], output=data / "w.safetensors"), tmp_path / "run")
    (tmp_path / "svm").mkdir()
    refuse_output_among_inputs(Cfg(kind=str(tmp_path / "svm")), tmp_path / "svm" / "run1")
    with pytest.raises(TubError, match="the default run directory"):  # no -o given: the message says so
        refuse_output_among_inputs(Cfg(inputs=[data]), data / "runs", given_o=False)
    (tmp_path / "ex" / "outputs" / "mine").mkdir(parents=True)
    (tmp_path / "ex" / "outputs" / "relevances.csv").write_text("a\n1\n")
    (tmp_path / "ex" / "labelled.extxyz").write_text("")
    for inside in ("outputs/relevances.csv", "outputs/mine", "labelled.extxyz"):  # --overwrite would replace them
        with pytest.raises(TubError, match="lies inside the run directory"):
            refuse_output_among_inputs(Cfg(inputs=[tmp_path / "ex" / inside]), tmp_path / "ex")
    (model_run / "checkpoints").mkdir()  # a model given as its run's checkpoints/ folder: the same exception
    refuse_output_among_inputs(Cfg(model=model_run / "checkpoints"), model_run / "checkpoints" / "x")
    with pytest.raises(TubError, match="inside the input"):  # a run directory given as data, not as a model
        refuse_output_among_inputs(Cfg(inputs=[model_run]), model_run / "explain")

    class Lookup(BaseModel):
        image_root: Path | None = Field(None, json_schema_extra={"lookup": True})  # files found by name only

    refuse_output_among_inputs(Lookup(image_root=data), data / "runs" / "x", given_o=False)


def test_an_input_in_the_run_outputs_is_refused_before_any_record(toy_plugins, tmp_path):
    inputs = make_inputs(tmp_path / "run" / "outputs", 1)
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    result = invoke(["toy", "evaluate", *inputs, "-o", tmp_path / "run"])
    assert result.exit_code == 2 and "lies inside the run directory" in result.stderr
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before


def test_a_non_finite_loss_or_nan_weights_stop_a_training(tmp_path):
    import torch

    from tubcli.runs import Run, require_finite_loss

    assert require_finite_loss(torch.tensor(0.5), 3) == 0.5
    for bad in (float("nan"), float("inf")):
        with pytest.raises(TubError, match="training diverged: the loss is .* at step 3") as exc:
            require_finite_loss(torch.tensor(bad), 3)
        assert exc.value.exit_code == 1

    class Cfg(BaseModel):
        seed: int = 0

    run = Run("toy", "train", Cfg(), out=tmp_path / "run", training=True)
    run.save_checkpoint({"model": {"w": torch.ones(2)}, "best": float("inf")})  # an inf number is no weight
    with pytest.raises(TubError, match="weights hold NaN"):
        run.save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan")])}})
    assert torch.equal(torch.load(tmp_path / "run" / "checkpoints" / "last.pt")["model"]["w"], torch.ones(2))


def test_a_folder_of_the_users_is_not_taken_over_as_a_run_directory(toy_plugins, tmp_path):
    """`-o .` in a project folder once renamed the user's config.yaml to config.1.yaml (with --overwrite)."""
    project = tmp_path / "project"
    project.mkdir()
    inputs = make_inputs(tmp_path / "in", 2)
    (project / "config.yaml").write_text("seed: 1\n")
    result = invoke(["toy", "evaluate", *inputs, "-o", project, "--overwrite"])
    assert result.exit_code == 2 and "holds config.yaml but no tub run records" in result.stderr
    assert (project / "config.yaml").read_text() == "seed: 1\n" and not (project / "config.1.yaml").exists()
    # nor a metrics.json or outputs/ of the user's (they were overwritten, without --overwrite)
    other = tmp_path / "other"
    (other / "outputs").mkdir(parents=True)
    (other / "metrics.json").write_text('{"accuracy": 0.93}')
    (other / "outputs" / "item000.txt").write_text("mine")
    result = invoke(["toy", "evaluate", *inputs, "-o", other])
    assert result.exit_code == 2 and "holds metrics.json, outputs but no tub run records" in result.stderr
    assert (other / "metrics.json").read_text() == '{"accuracy": 0.93}'
    assert (other / "outputs" / "item000.txt").read_text() == "mine"
    (tmp_path / "notes").mkdir()  # other files of the user's are no obstacle
    (tmp_path / "notes" / "README.md").write_text("mine")
    assert invoke(["toy", "evaluate", *inputs, "-o", tmp_path / "notes"]).exit_code == 0
    (tmp_path / "empty").mkdir()  # an empty folder made beforehand is fine
    assert invoke(["toy", "evaluate", *inputs, "-o", tmp_path / "empty"]).exit_code == 0


def test_identical_trainings_write_identical_checkpoint_files(toy_plugins, tmp_path):
    """torch.save on the temporary path named the archive after it: identical runs differed in bytes."""
    data = tmp_path / "d.csv"
    data.write_text("1,0,2\n0,1,3\n")
    for run in ("a", "b"):
        assert invoke(["toy", "train", data, "--epochs", "2", "-o", tmp_path / run]).exit_code == 0
    assert (tmp_path / "a/checkpoints/last.pt").read_bytes() == (tmp_path / "b/checkpoints/last.pt").read_bytes()


def test_a_complete_run_sweeps_what_a_killed_job_left_beside_side_outputs(toy_plugins, tmp_path):
    """kill -9 while an item wrote a figure or GeoJSON left its .tmp-* file for good: the rerun redid the item
    (its main output was missing) and wrote DONE, but only that output's temporaries were looked for. A
    complete run now removes every temporary no one has written since it began; a live writer's stays."""
    out = tmp_path / "run"
    inputs = make_inputs(tmp_path / "in", 3)
    assert invoke(["toy", "evaluate", *map(str, inputs[:2]), "-o", str(out)]).exit_code == 0
    figs = out / "outputs" / "figures"
    figs.mkdir()
    stale = [figs / ".tmp-item002_lrp-mihxa_dv.geojson", out / "outputs" / ".tmp-item002_scores-ab12cd34.json"]
    for p in stale:
        p.write_text("{half")
        os.utime(p, (time.time() - 5, time.time() - 5))
    for final in (figs / "item002_lrp.geojson", out / "outputs" / "item002_scores.json", figs / "item000_ig.png"):
        final.write_text("{}")  # what the rerun made of them
    notes = figs / ".tmp-my-notes-20241231"  # a user's own file, named alike, with no output beside it
    notes.write_text("mine")
    os.utime(notes, (time.time() - 5, time.time() - 5))
    live = figs / ".tmp-item000_ig-zz99yy88.png"  # another job writing right now (modified after we began)
    live.write_text("...")
    os.utime(live, (time.time() + 60, time.time() + 60))
    keep = figs / ".tmp-notes.txt"  # not a name atomic_path makes
    keep.write_text("mine")
    os.utime(keep, (time.time() - 5, time.time() - 5))
    # kill -9 between a lock's owner file and its link: the owner file stayed (pathorob stainnorm, 1 of 2 kills)
    owner = figs / ".p0028.png.lock.peb3k_rx"
    owner.write_text("vm 12345\n")
    os.utime(owner, (time.time() - 5, time.time() - 5))
    stale.append(owner)
    result = invoke(["toy", "evaluate", *map(str, inputs), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert (out / "DONE").exists() and not any(p.exists() for p in stale)
    assert live.exists() and keep.exists() and notes.exists()
    assert "removed the partial files an earlier, interrupted job left" in result.stderr


def test_a_lock_made_just_before_a_signal_is_still_released(tmp_path):
    """SIGTERM between the lock file's creation and ``held = True`` left the lock (a flaky CI run): a rerun
    elsewhere would skip the item as taken. release() removes a lock that names this process."""
    lock = ItemLock(tmp_path / "a.txt")
    lock._create(lock.path)  # ... and interrupted before acquire() set held
    assert lock.path.exists() and not lock.held
    lock.release()
    assert not lock.path.exists()
    other = ItemLock(tmp_path / "b.txt")
    other.path.write_text("another-host 1\n")  # another job's lock is never ours to remove
    other.release()
    assert other.path.exists()


def test_an_existing_run_directory_in_a_folder_not_ours_to_write(toy_plugins, tmp_path, monkeypatch):
    """`-o ~` or `-o /scratch/$USER`: the directory is writable, its parent is not. The claim lock used to
    be made beside the directory, so such a run failed with a PermissionError on a lock file."""
    import tubcli.runs as runs

    (tmp_path / "scratch" / "me").mkdir(parents=True)
    parent = str(tmp_path / "scratch")
    real_access = os.access
    monkeypatch.setattr(runs.os, "access", lambda p, mode: False if str(p) == parent else real_access(p, mode))
    seen = []
    real_create = ItemLock._create
    monkeypatch.setattr(ItemLock, "_create", staticmethod(lambda path: (seen.append(path), real_create(path))[1]))
    result = invoke(["toy", "evaluate", *make_inputs(tmp_path / "in", 2), "-o", tmp_path / "scratch" / "me"])
    assert result.exit_code == 0, result.stderr
    assert seen[0].parent == tmp_path / "scratch" / "me"  # the claim lock inside the run directory
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == ["me"]
    assert not list((tmp_path / "scratch" / "me").glob("*.claim*")) and (tmp_path / "scratch" / "me" / "DONE").exists()


def test_a_failure_while_writing_the_records_leaves_no_half_made_run(toy_plugins, tmp_path, monkeypatch):
    """A full disk (or quota) while config.yaml/env.json were written left a run directory that the rerun
    refused ("holds a config.yaml but no tub run records"); the error now says what to do."""
    import errno

    import tubcli.runs as runs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "env.json"))

    inputs = make_inputs(tmp_path / "in", 2)
    with monkeypatch.context() as m:
        m.setattr(runs, "write_json", full)
        result = invoke(["toy", "evaluate", *inputs, "-o", tmp_path / "run"])
    assert result.exit_code == 1 and not (tmp_path / "run").exists()
    assert result.stderr.strip().splitlines()[-1].startswith("error: no space left on the device or quota exceeded: ")
    assert invoke(["toy", "evaluate", *inputs, "-o", tmp_path / "run"]).exit_code == 0  # the rerun works


def test_a_failed_run_empties_but_keeps_an_empty_folder_the_user_made(toy_plugins, tmp_path, monkeypatch):
    """A prepared scratch folder (setgid, group, ACLs) given as -o is the user's: a run that fails before
    any output takes its own records out again and leaves the folder itself."""
    import errno
    import stat

    import tubcli.runs as runs

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    scratch.chmod(0o2770)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(scratch / "env.json"))

    with monkeypatch.context() as m:
        m.setattr(runs, "write_json", full)
        result = invoke(["toy", "evaluate", *make_inputs(tmp_path / "in", 2), "-o", scratch])
    assert result.exit_code == 1
    assert scratch.is_dir() and list(scratch.iterdir()) == []
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o2770

    keep = tmp_path / "prepared"  # a folder kept in git by a .keep: this run's records go, the .keep stays
    keep.mkdir()
    (keep / ".keep").write_text("")
    with monkeypatch.context() as m:
        m.setattr(runs, "write_json", full)
        assert invoke(["toy", "evaluate", *make_inputs(tmp_path / "in", 2), "-o", keep]).exit_code == 1
    assert sorted(p.name for p in keep.iterdir()) == [".keep"]
    assert invoke(["toy", "evaluate", *make_inputs(tmp_path / "in", 2), "-o", keep]).exit_code == 0


def test_a_failed_run_leaves_alone_a_directory_another_job_has_claimed_since(toy_plugins, tmp_path, monkeypatch):
    """Two jobs on one -o: the first fails after the second has written its records; undoing the first
    must not delete the second's (it then ended with DONE but no config.yaml or env.json)."""
    import json

    import tubcli.runs as runs

    out = tmp_path / "shared"

    def other_job_then_fail(path, data, *args, **kwargs):
        Path(path).write_text(json.dumps({**data, "pid": 1, "host": "another-node"}))
        raise OSError(28, "No space left on device", str(path))

    with monkeypatch.context() as m:
        m.setattr(runs, "write_json", other_job_then_fail)
        assert invoke(["toy", "evaluate", *make_inputs(tmp_path / "in", 2), "-o", out]).exit_code == 1
    assert json.loads((out / "env.json").read_text())["host"] == "another-node" and (out / "config.yaml").exists()


def test_home_in_paths_the_shell_left_alone_is_expanded(toy_plugins, tmp_path, monkeypatch):
    """`--out=~/x`, a quoted TUB_RUNS_DIR='~/runs' or `data: ~/x` in YAML made a folder literally named `~`."""
    from tubcli.config import resolve_config
    from tubcli.runs import default_runs_root

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUB_RUNS_DIR", "~/runs")
    assert default_runs_root() == tmp_path / "home" / "runs"
    result = invoke(["toy", "evaluate", *make_inputs(tmp_path / "in", 1), "--out=~/r"])
    assert result.exit_code == 0 and (tmp_path / "home" / "r" / "DONE").exists() and not (tmp_path / "~").exists()

    from tubcli.config import TubConfig

    class WithPaths(TubConfig):
        data: Path | None = None
        many: list[Path] = []

    cfg = resolve_config(WithPaths, "toy", None, ["data=~/d.csv", "many=[~/a, b]"], {})
    assert cfg.data == tmp_path / "home" / "d.csv" and cfg.many == [tmp_path / "home" / "a", Path("b")]


def test_unicode_paths_are_recorded_as_written():
    from tubcli.config import TubConfig, config_yaml

    class WithPath(TubConfig):
        data: Path = Path("té中 🧪.csv")

    assert "data: té中 🧪.csv" in config_yaml(WithPath())


def test_a_closed_stdout_is_not_an_error(toy_env, tmp_path):
    """`tub ... >&-`: sys.stdout is None; the results are not wanted (was: AttributeError, exit 1)."""
    import shlex

    cmd = " ".join(map(shlex.quote, toy_cli(["toy", "evaluate", *make_inputs(tmp_path / "in", 1), "-o", tmp_path / "r"],
                                            toy_env)))
    proc = subprocess.run(["sh", "-c", f"{cmd} >&-"], env=toy_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr
    assert (tmp_path / "r" / "DONE").exists()


def test_resume_on_a_verb_that_does_not_train_is_refused(toy_plugins, tmp_path):
    """--resume was accepted and ignored on non-training verbs (mlff md --resume auto started a fresh run
    elsewhere), while --shard on a non-batch verb was refused."""
    result = invoke(["toy", "evaluate", *make_inputs(tmp_path / "in", 1), "--resume", "auto", "-o", tmp_path / "r"])
    assert result.exit_code == 2 and "--resume continues a training; 'evaluate' does not train" in result.stderr
    assert not (tmp_path / "r").exists()


def test_item_records_count_the_items_whose_output_exists(tmp_path):
    """A verb's totals come from per-item records, so a rerun that completes an interrupted run reports
    the run's total; a record whose output is gone (never written, or removed) does not count."""
    from tubcli.config import TubConfig
    from tubcli.runs import Run

    run = Run("toy", "evaluate", TubConfig(), out=tmp_path / "r")
    for name in ("a", "b", "c"):
        out = run.outputs_dir / "sub" / f"{name}.txt"
        run.record_item(out, {"n": len(name) + 1, "name": name})
        if name != "b":  # b: killed between its record and its output
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("done")
    assert run.item_records() == [{"n": 2, "name": "a"}, {"n": 2, "name": "c"}]
    (run.outputs_dir / "sub" / "a.txt").unlink()
    assert [r["name"] for r in run.item_records()] == ["c"]


def test_a_run_record_that_is_a_symlink_is_refused_not_written_through(toy_plugins, tmp_path):
    """tub.log and metrics.jsonl are appended to: a link planted in a reused run folder would route them into
    another file."""
    inputs = make_inputs(tmp_path / "in", 2)
    out = tmp_path / "run"
    assert invoke(["toy", "evaluate", *inputs, "-o", out]).exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "tub.log").unlink()
    (out / "tub.log").symlink_to(victim)
    result = invoke(["toy", "evaluate", *inputs, "-o", out, "--overwrite"])
    assert result.exit_code == 2 and "tub.log is a symbolic link" in result.stderr
    assert victim.read_text() == "precious"


def test_a_file_replaced_in_place_is_refused_once_outputs_exist(tmp_path):
    from tubcli.config import TubConfig
    from tubcli.runs import Run

    weights = tmp_path / "w.bin"
    weights.write_bytes(b"first")
    run = Run("toy", "label", TubConfig(), out=tmp_path / "r")
    first = run.refuse_replaced_file("--weights", weights)
    (run.outputs_dir / "a.txt").write_text("made with the first weights")
    run.finish({})
    weights.write_bytes(b"first")  # rewritten with the same bytes: the same file
    again = Run("toy", "label", TubConfig(), out=tmp_path / "r")
    assert again.refuse_replaced_file("--weights", weights) == first
    again.finish({})
    weights.write_bytes(b"second")
    later = Run("toy", "label", TubConfig(), out=tmp_path / "r")
    with pytest.raises(TubError, match=r"--weights .*w.bin is not the file .* \(its sha256 changed\)"):
        later.refuse_replaced_file("--weights", weights)
    later.finish({})
    redo = Run("toy", "label", TubConfig(), out=tmp_path / "r", overwrite=True)
    assert redo.refuse_replaced_file("--weights", weights) != first
    redo.finish({})
    assert json.loads((tmp_path / "r" / "file_digests.json").read_text())["--weights"] != first
    (tmp_path / "r" / "file_digests.json").unlink()  # a folder of an older tub: outputs, no record
    older = Run("toy", "label", TubConfig(), out=tmp_path / "r")
    older.refuse_replaced_file("--weights", weights)
    older.finish({})
    assert not (tmp_path / "r" / "file_digests.json").exists()  # not vouched for: these bytes may not have made them
    assert "records no sha256 of --weights" in (tmp_path / "r" / "tub.log").read_text()


def test_a_checkpoint_that_resume_could_not_load_is_refused_at_the_save(tmp_path):
    """A numpy scalar saved without a word made `--resume` fail days later, telling the user to re-save a file
    the plugin wrote; a NaN in a buffer of samples (data, not weights) may be kept where the plugin says so."""
    import numpy as np
    import torch

    from tubcli.config import TubConfig
    from tubcli.runs import Run

    run = Run("toy", "train", TubConfig(), out=tmp_path / "r", training=True)
    with pytest.raises(TypeError, match=r"checkpoint state\['best_loss'\] \(numpy.float64\) needs pickle"):
        run.save_checkpoint({"w": torch.zeros(2), "best_loss": np.float64(0.1)})
    with pytest.raises(TypeError, match=r"state\['extra'\]\[1\] \(numpy.ndarray\)"):
        run.save_checkpoint({"extra": [1, np.zeros(2)]})
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists()
    samples = {"w": torch.zeros(2), "energies": torch.tensor([1.0, float("nan")])}
    with pytest.raises(TubError, match="training diverged"):
        run.save_checkpoint(samples)
    run.save_checkpoint(samples, nan_allowed=("energies",))
    run.finish({})
    again = Run("toy", "train", TubConfig(), out=tmp_path / "r", training=True, resume="auto")
    assert torch.isnan(again.load_checkpoint()["energies"][1])
    again.finish({})


def test_env_json_records_what_an_auditor_needs(toy_plugins, tmp_path, monkeypatch):
    """env.json named the working folder's git commit (null outside a repository, another project's inside
    one), no numerical package versions, no threads, inputs by path only, and a shard replaced the other's."""
    import hashlib

    import tubcli

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    items = make_inputs(tmp_path / "in", 4)
    out = tmp_path / "r"
    for shard in ("0/2", "1/2"):
        result = invoke(["toy", "evaluate", *items, "--shard", shard, "-o", out])
        assert result.exit_code == 0, result.stderr
    env = json.loads((out / "env.json").read_text())
    assert set(env["shards"]) == {"0/2", "1/2"} and all(s["host"] for s in env["shards"].values())
    assert env["packages"]["numpy"] and env["packages"]["torch"]
    assert env["threads"]["OMP_NUM_THREADS"] == "1" and env["threads"]["cpu_count"] >= 1
    first = next(e for e in env["inputs"] if e["path"] == str(items[0]))
    assert first["sha256"] == hashlib.sha256(items[0].read_bytes()).hexdigest() and first["size"] == 1
    source = Path(tubcli.__file__).resolve().parents[1]
    if (source / ".git").exists():  # tub from a checkout (an editable install): its commit, from any folder
        import subprocess

        head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert env["git_commit"] == head.strip() and isinstance(env["git_local_changes"], bool)
    else:
        assert env["git_commit"] is None


def test_env_json_names_the_device_the_run_resolved(tmp_path):
    """--device auto records no device in config.yaml: env.json gets the one used once a verb asks for it."""
    from tubcli.config import TubConfig
    from tubcli.runs import Run

    run = Run("toy", "train", TubConfig(device="auto"), out=tmp_path / "r", training=True)
    assert "device" not in json.loads((tmp_path / "r" / "env.json").read_text())
    device = str(run.device)
    env = json.loads((tmp_path / "r" / "env.json").read_text())
    assert env["device"] == device and env["packages"] and not (tmp_path / "r" / "env.json.lock").exists()
    run.finish({})


def test_signals_wait_for_a_block_that_must_happen_whole():
    """md wrote a frame, then the state that resumes after it: a SIGTERM between the two made the resume
    statistical. Inside signals_deferred() SIGTERM arrives when the block ends."""
    code = ("import os, signal\nfrom tubcli.errors import Terminated, on_sigterm, signals_deferred\n"
            "signal.signal(signal.SIGTERM, on_sigterm)\n"
            "try:\n    with signals_deferred():\n        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        print('block finished', flush=True)\n    print('after the block', flush=True)\n"
            "except Terminated:\n    print('terminated', flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.split("\n")[:2] == ["block finished", "terminated"]


def test_an_item_whose_output_changes_as_it_is_made_is_locked_by_one_name(tmp_path):
    """xmil heatmap marks a slide done by its first missing method overlay: a job that had drawn one method
    locked the next name, and a second job took the slide at the same time (4 of 24 slides, 3 jobs)."""
    from tubcli.config import TubConfig
    from tubcli.runs import Run

    run = Run("toy", "evaluate", TubConfig(), out=tmp_path / "r")
    other = ItemLock(run.outputs_dir / "a.heatmaps")
    assert other.acquire()  # another job is drawing slide a (its 'lrp' overlay exists, 'ig' does not yet)
    (run.outputs_dir / "a_lrp.png").write_text("x")
    pending = lambda item: run.outputs_dir / (f"{item}_ig.png")  # noqa: E731
    got = [item for item, _ in run.batch(["a", "b"], output_for=pending,
                                         lock_for=lambda item: run.outputs_dir / f"{item}.heatmaps")]
    assert got == ["b"] and run.batch_stats["skipped_locked"] == 1
    run.finish({})  # 'delete its lock' names the lock that is there, not one the output would have had
    assert f"delete its lock {other.path} if no job" in (run.dir / "tub.log").read_text()
    other.release()


def test_a_run_that_fails_before_any_output_removes_the_empty_folders_it_made(toy_plugins, tmp_path, monkeypatch):
    """`tub atlas inspect` with no file left ./runs/atlas/inspect behind; folders that were there (or that hold
    another run) stay."""
    monkeypatch.setenv("TUB_RUNS_DIR", str(tmp_path / "runs"))
    assert invoke(["toy", "evaluate", str(tmp_path / "absent.txt")]).exit_code == 2
    assert not (tmp_path / "runs").exists()
    assert invoke(["toy", "evaluate", str(tmp_path / "absent.txt"), "-o", tmp_path / "a" / "b" / "c"]).exit_code == 2
    assert not (tmp_path / "a").exists()
    (tmp_path / "mine").mkdir()
    assert invoke(["toy", "evaluate", str(tmp_path / "absent.txt"), "-o", tmp_path / "mine" / "b"]).exit_code == 2
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "mine" / "b").exists()
    assert invoke(["toy", "evaluate", *make_inputs(tmp_path / "in", 1)]).exit_code == 0
    assert invoke(["toy", "evaluate", str(tmp_path / "absent.txt")]).exit_code == 2
    assert len(list((tmp_path / "runs" / "toy" / "evaluate").iterdir())) == 1  # the finished run's


def test_a_rerun_with_other_settings_says_that_earlier_outputs_stay(toy_plugins, tmp_path):
    """Files only the earlier settings made must not pass silently for this run's: the rerun's log says the
    folder holds them (its config.yaml is kept as config.<n>.yaml); a rerun with the same settings says nothing."""
    import numpy as np
    from safetensors.numpy import save_file

    w = tmp_path / "w.safetensors"
    save_file({"weight": np.ones(3, np.float32)}, str(w))
    out = tmp_path / "r"
    assert invoke(["toy", "explain", w, "-o", out]).exit_code == 0
    (out / "outputs" / "only_the_first_settings.txt").write_text("stale")
    same = invoke(["toy", "explain", w, "-o", out])
    assert same.exit_code == 0 and "earlier run with other settings" not in same.stderr
    other = invoke(["toy", "explain", w, "--seed", "7", "-o", out])
    assert other.exit_code == 0 and (out / "config.1.yaml").exists()
    assert "outputs holds files of an earlier run with other settings (seed: 0 -> 7; now config.1.yaml)" in other.stderr
    result = invoke(["toy", "explain", w, "--overwrite", "-o", out])  # accepted and ignored before
    assert result.exit_code == 2 and "replaces its outputs on every run: drop --overwrite" in result.stderr
