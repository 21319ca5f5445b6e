"""Faults around a run: signals at any moment (also twice, also SIGHUP), torchrun's variables without
peers, a failed, killed or frozen rank, killed runs' stores, commands that do not support torchrun.

Timing bounds are generous (a loaded 2-core machine): the fixed behaviour takes seconds, the faults
they guard against took 30 minutes or more.
"""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY_FLAGS, tiny_eval_flags

import commons
import leftovers
import run_progress
from dense_store import DenseStore

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _stop_signals_as_a_terminal_sends_them():
    """Run in the child before it starts: a test session started in the background of a shell (`cmd &`,
    no job control) passes SIGINT on ignored, and one under nohup SIGHUP; the runs under test must meet
    these signals as a terminal delivers them."""
    for name in ("SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)


class _Watched:
    """A subprocess whose combined output is collected line by line while it runs."""

    def __init__(self, command, *, cwd, env):
        self.proc = subprocess.Popen(
            command,
            cwd=str(cwd),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: the test can end everything it started
            preexec_fn=_stop_signals_as_a_terminal_sends_them,
        )
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self):
        return "".join(self.lines)

    def wait_for(self, predicate, *, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        assert predicate(), f"{what}; output:\n{self.output[-4000:]}"

    def wait(self, timeout):
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill_all(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


# ------------------------------------------------------------------------------------------------
# 1. torchrun's variables without peers: the wait says what it waits for, signals end it
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_waiting_for_peers_that_never_come_says_so_and_ends_on_a_signal(synthetic_root, tmp_path, sig, code):
    """`python3 eval.py` with torchrun's variables left in the shell and no other process: a line says
    at once what it waits for, and SIGTERM / Ctrl-C end it within seconds (it ignored both for 1800 s)."""
    port = _free_port()
    env = _env(WORLD_SIZE=2, RANK=0, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    argv = [sys.executable, os.path.join(ROOT, "eval.py"), *tiny_eval_flags(synthetic_root, "--save_dir", "alone")]
    job = _Watched(argv, cwd=tmp_path, env=env)
    try:
        job.wait_for(lambda: "Joining a torchrun job" in job.output, timeout=180, what="no line about the wait")
        waiting = next(line for line in job.lines if "Joining a torchrun job" in line)
        assert f"rank 0 of 2, rendezvous at 127.0.0.1:{port}" in waiting and "SELAVPR_DIST_TIMEOUT_S" in waiting
        assert "unset WORLD_SIZE RANK LOCAL_RANK MASTER_ADDR MASTER_PORT" in waiting
        time.sleep(1)
        sent = time.time()
        job.proc.send_signal(sig)
        returned = job.wait(60)
        seconds = time.time() - sent
    finally:
        job.kill_all()
    print(f"{sig.name}: exit {returned} {seconds:.2f} s after the signal")
    assert seconds < 30, seconds
    (folder,) = glob.glob(str(tmp_path / "test" / "alone" / "*"))
    log = open(os.path.join(folder, "info.log")).read()  # rank 0 logs the wait (and its end)
    assert "Joining a torchrun job" in log
    if commons._release(torch.__version__) < (2, 1):
        # torch 2.0 holds the interpreter's lock while it waits: the signal's default action ends it.
        assert returned == -sig
        return
    assert returned == code
    assert "Stopped while waiting for the other processes of the torchrun job" in job.output
    assert "Stopped while waiting" in log
    assert ("Interrupted by the user." if sig == signal.SIGINT else "Terminated (SIGTERM") in log


def _place(**kwargs):
    values = dict(rank=0, world_size=2, address="10.0.0.1:29500", timeout_s=60.0, by_torchrun=True)
    values.update(kwargs)
    return commons.JobPlace(**values)


def test_the_wait_to_join_is_reported_periodically_and_bounded(monkeypatch, caplog):
    monkeypatch.setattr(commons, "JOIN_REPORT_EVERY_S", 0.3)
    release = threading.Event()

    def join():
        release.wait(30)
        return "the wait group"

    threading.Timer(1.2, release.set).start()
    with caplog.at_level("INFO"):
        assert commons.join_process_group(join, place=_place(), poll_s=0.05) == "the wait group"
    joining = [r for r in caplog.records if r.message.startswith("Joining the torchrun job (rank 0 of 2")]
    still = [r for r in caplog.records if r.message.startswith("Still waiting for the other processes")]
    assert len(joining) == 1 and len(still) >= 2, caplog.text
    assert "rendezvous at 10.0.0.1:29500" in still[0].message and "SELAVPR_DIST_TIMEOUT_S" in still[0].message

    # The main thread's own bound, should the C++ wait never return.
    monkeypatch.setattr(commons, "JOIN_GRACE_S", 0.2)
    blocked = threading.Event()
    with pytest.raises(commons.UserError, match="the other processes of the torchrun job never joined"):
        commons.join_process_group(lambda: blocked.wait(30), place=_place(timeout_s=0.3), poll_s=0.05)
    blocked.set()


def test_threads_the_rendezvous_starts_leave_stop_signals_to_the_main_thread():
    """gloo's threads are started by the rendezvous: a signal they took would wait until the main thread
    next runs Python code (after a blocked collective returns); blocked there, it reaches the main thread."""
    masks = []

    def join():  # as init_process_group, which starts gloo's loop threads
        thread = threading.Thread(target=lambda: masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
        thread.start()
        thread.join()

    commons.join_process_group(join, place=_place(), poll_s=0.05)
    assert set(commons.STOP_SIGNALS) <= set(masks[0])
    assert not set(commons.STOP_SIGNALS) & set(signal.pthread_sigmask(signal.SIG_BLOCK, []))  # main: unchanged


def test_rendezvous_errors_name_the_real_cause():
    def timed_out():
        raise RuntimeError("Timed out after 4 seconds waiting for clients. 1/2 clients joined.")

    with pytest.raises(commons.UserError) as error:
        commons.join_process_group(timed_out, place=_place(by_torchrun=False), poll_s=0.05)
    text = str(error.value)
    assert "never joined: this process (rank 0 of 2, rendezvous at 10.0.0.1:29500)" in text
    assert "(Timed out after 4 seconds waiting for clients. 1/2 clients joined)" in text
    assert (
        "torchrun did not start this process (a scheduler's script, a copied shell?): to run one process, unset" in text
    )

    def socket_timeout():  # torch 2.0's words for the same
        raise RuntimeError("Socket Timeout")

    with pytest.raises(commons.UserError, match=r"never joined: .*\(Socket Timeout\)"):
        commons.join_process_group(socket_timeout, place=_place(), poll_s=0.05)

    def in_use():
        raise RuntimeError("The server socket has failed to listen on any local network address. port: 29500")

    with pytest.raises(commons.UserError, match=r"could not join the torchrun job \(rank 0 of 2.*failed to listen"):
        commons.join_process_group(in_use, place=_place(), poll_s=0.05)


def test_ctrl_c_ends_the_wait_to_join_at_once(caplog):
    # Ctrl-C as Python delivers it, also in a session started with SIGINT ignored (`pytest &`).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    blocked = threading.Event()
    ctrl_c = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    ctrl_c.start()
    start = time.monotonic()
    try:
        with caplog.at_level("INFO"), pytest.raises(KeyboardInterrupt):
            commons.join_process_group(lambda: blocked.wait(60), place=_place(), poll_s=10)
    finally:
        ctrl_c.cancel()  # should the call fail at once, the Ctrl-C must not hit the rest of the session
        blocked.set()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 5  # not the 60 s that join() would block, nor the 10 s poll
    assert "Stopped while waiting for the other processes of the torchrun job" in caplog.text


def test_peers_that_never_join_are_named_as_the_cause(synthetic_root, tmp_path):
    env = _env(
        WORLD_SIZE=2, RANK=0, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port(), SELAVPR_DIST_TIMEOUT_S=3
    )
    argv = [sys.executable, os.path.join(ROOT, "eval.py"), *tiny_eval_flags(synthetic_root, "--save_dir", "alone")]
    result = subprocess.run(argv, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "error: the other processes of the torchrun job never joined" in result.stdout
    assert "the limit SELAVPR_DIST_TIMEOUT_S=3 sets" in result.stdout
    assert "another process of this torchrun job failed" not in result.stdout and "Traceback" not in result.stdout


# ------------------------------------------------------------------------------------------------
# 2. A rank that fails or is killed: rank 0's log names it, and no rank's store is left
# ------------------------------------------------------------------------------------------------

FAILING_RANK = r"""
import os, signal, sys, runpy
sys.path.insert(0, {root!r})
import dense_store
real_append = dense_store.DenseStore.append

def append(self, features):
    real_append(self, features)
    if self.on_disk and os.environ["RANK"] == "1":
        self._writer.flush()  # rank 1's share is partly on disk, in dense_features_rank1/
        if {mode!r} == "raise":
            raise ValueError("injected failure on rank 1")
        os.kill(os.getpid(), signal.SIGKILL)

dense_store.DenseStore.append = append
sys.argv = ["eval.py"] + sys.argv[1:]
runpy.run_path(os.path.join({root!r}, "eval.py"), run_name="__main__")
"""


def _torchrun_command(script_and_args, nproc=2):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        *script_and_args,
    ]


@pytest.mark.parametrize("mode", ["raise", "sigkill"])
def test_a_failed_rank_is_named_in_rank_0s_log_and_no_temp_store_is_left(synthetic_root, tmp_path, mode):
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK.format(root=ROOT, mode=mode))
    flags = tiny_eval_flags(
        synthetic_root, "--efficient_ram_testing", "--infer_batch_size", "4", "--rerank_num", "10", "--save_dir", "f"
    )
    result = subprocess.run(
        _torchrun_command([str(script), *flags]),
        cwd=str(tmp_path),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    (folder,) = glob.glob(str(tmp_path / "test" / "f" / "*"))
    log = open(os.path.join(folder, "info.log")).read()
    print(log[-1500:])
    if mode == "raise":
        assert re.search(r"rank 1 \(process \d+\) failed: ValueError: injected failure on rank 1", log), log[-3000:]
    else:
        assert re.search(r"rank 1 \(process \d+\) ended without an error message \(killed: kill -9", log), log[-3000:]
    assert "Terminated (SIGTERM received" not in log and "Unexpected error" not in log
    # No rank's temp store is left. eval.py keeps what each rank recorded of its stages (named by stage,
    # not temp stores) for --continue_run: test_distributed continues such a job.
    kept = glob.glob(os.path.join(folder, "dense_features*", "*"))
    assert not [p for p in kept if os.path.basename(p).startswith(DenseStore.FILE_PREFIX)], kept
    assert all(os.path.basename(p).split(".")[0] in run_progress.STAGES for p in kept), kept
    for store_folder in ("dense_features", "dense_features_rank1"):  # rank 0's (stopped by torchrun) and 1's
        assert os.path.exists(os.path.join(folder, store_folder, "database.dense")), kept
    assert "This run can be continued where it stopped: run the same command with --continue_run" in log


# ------------------------------------------------------------------------------------------------
# 3. Leftovers: signals twice, SIGHUP, killed runs' stores
# ------------------------------------------------------------------------------------------------

# localize.py with --efficient_ram_testing: its dense store is a temp store (eval.py's are its recorded
# stages, kept for --continue_run when it stops: tests/test_run_progress.py).
SLOW_RUN = r"""
import os, runpy, sys, time
sys.path.insert(0, {root!r})
import dense_store
real_append, real_close = dense_store.DenseStore.append, dense_store.DenseStore.close

def append(self, features):
    real_append(self, features)
    if self.on_disk:
        self._writer.flush()
        open({marker!r}, "w").close()  # part of the dense features is on disk: the test signals now
        time.sleep(120)

def close(self):
    if self.on_disk and self._owns_file:
        open({marker!r} + ".closing", "w").close()  # the cleanup has begun: a second signal comes now
        time.sleep({close_delay!r})
    real_close(self)

dense_store.DenseStore.append = append
dense_store.DenseStore.close = close
sys.argv = ["localize.py"] + {argv!r}
runpy.run_path(os.path.join({root!r}, "localize.py"), run_name="__main__")
"""


def _slow_run(synthetic_root, tmp_path, *, close_delay):
    marker = str(tmp_path / "extracting")
    split = os.path.join(*synthetic_root, "images", "test")
    argv = [
        *TINY_FLAGS,
        "--resize",
        "112",
        "112",
        "--allow_random_weights",
        "--efficient_ram_testing",
        "--infer_batch_size",
        "8",
        "--output_folder",
        str(tmp_path / "test" / "sig" / "run"),
        "--database_folder",
        os.path.join(split, "database"),
        "--queries_folder",
        os.path.join(split, "queries"),
    ]
    code = SLOW_RUN.format(root=ROOT, marker=marker, argv=argv, close_delay=close_delay)
    return _Watched([sys.executable, "-c", code], cwd=tmp_path, env=_env()), marker


def _stores_left(tmp_path):
    return glob.glob(str(tmp_path / "test" / "sig" / "*" / "dense_features*" / "*"))


def test_a_second_ctrl_c_during_the_cleanup_still_leaves_no_store(synthetic_root, tmp_path):
    """Ctrl-C, then Ctrl-C again while the store is being closed: the run stops at once, and removes
    its store (the second signal used to end the cleanup half way)."""
    job, marker = _slow_run(synthetic_root, tmp_path, close_delay=5)
    try:
        job.wait_for(lambda: os.path.exists(marker), timeout=240, what="the extraction never reached the disk store")
        assert _stores_left(tmp_path)
        job.proc.send_signal(signal.SIGINT)
        job.wait_for(lambda: os.path.exists(marker + ".closing"), timeout=60, what="the cleanup never began")
        sent = time.time()
        job.proc.send_signal(signal.SIGINT)
        assert job.wait(60) == 130
        seconds = time.time() - sent
    finally:
        job.kill_all()
    assert seconds < 4, seconds  # at once: not after the 5 s the close takes
    assert not _stores_left(tmp_path), _stores_left(tmp_path)
    assert not glob.glob(str(tmp_path / "test" / "sig" / "*" / "dense_features*"))  # the folder too
    (folder,) = glob.glob(str(tmp_path / "test" / "sig" / "*"))
    log = open(os.path.join(folder, "info.log")).read()
    assert "SIGINT received again while stopping after SIGINT: stopped at once; temporary files were removed" in log


def test_sighup_ends_a_run_like_sigterm(synthetic_root, tmp_path):
    """A dropped ssh connection (SIGHUP) stops the run cleanly: one log line, exit 129, no store left."""
    job, marker = _slow_run(synthetic_root, tmp_path, close_delay=0)
    try:
        job.wait_for(lambda: os.path.exists(marker), timeout=240, what="the extraction never reached the disk store")
        job.proc.send_signal(signal.SIGHUP)
        assert job.wait(60) == 129, job.output[-3000:]
    finally:
        job.kill_all()
    assert not _stores_left(tmp_path)
    (folder,) = glob.glob(str(tmp_path / "test" / "sig" / "*"))
    log = open(os.path.join(folder, "info.log")).read()
    assert log.count("Terminated (SIGHUP received: the terminal or ssh connection was closed)") == 1
    assert "Traceback" not in log


def test_an_ignored_sighup_stays_ignored(restore_logging):
    """`nohup python3 train.py ... &` ignores SIGHUP: run_main must not take that back."""
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        finished = []

        def main(args):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.3)
            finished.append(True)

        commons.run_main(main, None)
        assert finished == [True] and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)


def test_a_run_names_a_killed_runs_store_in_its_output_root(tmp_path, monkeypatch, restore_logging):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = leftovers.this_process()
    owner = leftovers.Owner(pid=dead.pid, boot=me.boot, host=me.host)
    killed = tmp_path / "test" / "run" / "2026-01-01_00-00-00" / "dense_features_rank1"
    killed.mkdir(parents=True)
    (killed / f"dense_{owner.tag}_0123456789ab.f32").write_bytes(b"\0" * (3 * 2**20))
    live = tmp_path / "test" / "run" / "2026-01-01_00-00-01" / "dense_features"
    live.mkdir(parents=True)
    (live / f"dense_{me.tag}_0123456789ab.f32").write_bytes(b"\0" * 100)  # a run still going: not named
    folder = os.path.join("test", "run", "2026-01-01_00-00-02")
    ctx = commons.start_run(SimpleNamespace(device="cpu", seed=-1, precision="fp32"), folder)
    commons.finish(ctx)
    log = open(os.path.join(folder, "info.log")).read()
    assert f"{killed} holds 3.0 MB of dense features left by a run that was killed (process {dead.pid} is gone)" in log
    assert f"Remove them with: rm -r {killed}" in log
    assert str(live) not in log


# ------------------------------------------------------------------------------------------------
# 4. A frozen rank (SIGSTOP): one line naming it and the variable that sets the wait
# ------------------------------------------------------------------------------------------------

FROZEN = r"""
import os, signal, sys, time
sys.path.insert(0, {root!r})
from types import SimpleNamespace
import commons

def main(args):
    ctx = commons.start_run(SimpleNamespace(device="cpu", seed=0, precision="fp32"), {folder!r})
    if ctx.rank == 1:
        with open({marker!r} + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename({marker!r} + ".tmp", {marker!r})
        time.sleep(600)  # the test stops this process (SIGSTOP) meanwhile
    while not os.path.exists({marker!r} + ".stopped"):
        time.sleep(0.1)
    if {operation!r} == "collective":
        ctx.sum_over_ranks([1.0])  # every rank works: SELAVPR_DIST_TIMEOUT_S
    else:
        ctx.wait_for_main()  # the others wait for rank 0 here, never rank 0 for them
    commons.finish(ctx)

commons.run_main(main, None, torchrun=True)
"""


@pytest.mark.parametrize("operation", ["collective", "wait_for_main"])
def test_a_frozen_rank_is_named_with_the_variable_that_sets_the_wait(tmp_path, operation):
    script, marker = tmp_path / "frozen.py", str(tmp_path / "rank1_pid")
    folder = str(tmp_path / "run")
    script.write_text(FROZEN.format(root=ROOT, folder=folder, marker=marker, operation=operation))
    env = _env(SELAVPR_DIST_TIMEOUT_S=5, SELAVPR_DIST_WAIT_S=900)
    job = _Watched(_torchrun_command([str(script)]), cwd=tmp_path, env=env)
    rank1 = None
    try:
        job.wait_for(lambda: os.path.exists(marker), timeout=180, what="rank 1 never started")
        rank1 = int(open(marker).read())
        os.kill(rank1, signal.SIGSTOP)
        open(marker + ".stopped", "w").close()
        log_path = os.path.join(folder, "info.log")
        job.wait_for(
            lambda: "stopped answering" in open(log_path).read(), timeout=120, what="rank 0 never gave up waiting"
        )
        os.kill(rank1, signal.SIGKILL)  # else torchrun's SIGTERM waits 30 s for a stopped process
        job.wait(120)
    finally:
        if rank1 is not None and leftovers.process_state(rank1) is not None:
            os.kill(rank1, signal.SIGKILL)
        job.kill_all()
    log = open(log_path).read()
    print(log[-1500:])
    line = next(line for line in log.splitlines() if "stopped answering" in line)
    assert f"error: rank 1 (process {rank1}) stopped answering: it is stopped (SIGSTOP" in line
    assert "; rank 0 waited 5 s, the limit SELAVPR_DIST_TIMEOUT_S sets; stopping." in line
    assert "Unexpected error" not in log and "Traceback" not in log


# ------------------------------------------------------------------------------------------------
# 5. Commands that run as one process refuse torchrun in one line
# ------------------------------------------------------------------------------------------------


def _one_process_commands(synthetic_root, tmp_path):
    split = os.path.join(*synthetic_root, "images", "test")
    image = sorted(glob.glob(os.path.join(split, "queries", "*.jpg")))[0]
    model = [*TINY_FLAGS, "--resize", "112", "112", "--allow_random_weights"]
    tool = [flag for flag in model if flag not in ("--num_workers", "0")]  # the tools load no data set
    return {
        "localize.py": [
            *model,
            "--database_folder",
            os.path.join(split, "database"),
            "--queries_folder",
            os.path.join(split, "queries"),
            "--output_folder",
            str(tmp_path / "out"),
        ],
        "reproduce.py": [*TINY_FLAGS, "--datasets_folder", synthetic_root[0], "--output", str(tmp_path / "out")],
        "tools/draw_matches.py": [*tool, image, image, "--output", str(tmp_path / "out.jpg")],
        "tools/heatmap.py": [*tool, image, "--output", str(tmp_path / "out.jpg")],
    }


@pytest.mark.parametrize("command", ["localize.py", "reproduce.py", "tools/draw_matches.py", "tools/heatmap.py"])
def test_one_process_commands_refuse_torchrun_in_one_line(synthetic_root, tmp_path, command):
    argv = _one_process_commands(synthetic_root, tmp_path)[command]
    env = _env(WORLD_SIZE=2, RANK=0, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port())
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, command), *argv],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    name = os.path.basename(command)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: {name} runs as one process and does not support torchrun (WORLD_SIZE=2 is set): run it with "
        f"python3 {name} ...; only train.py and eval.py run under torchrun. Unset WORLD_SIZE RANK LOCAL_RANK "
        "MASTER_ADDR MASTER_PORT (left in this shell)."
    ]
    assert not glob.glob(str(tmp_path / "out*"))  # nothing was started


def test_localize_starts_its_run_through_the_common_runtime(synthetic_root, tmp_path, monkeypatch, restore_logging):
    import localize

    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    started, real = [], commons.start_run

    def start_run(args, output_folder, **kwargs):
        started.append(output_folder)
        return real(args, output_folder, **kwargs)

    monkeypatch.setattr(commons, "start_run", start_run)
    argv = _one_process_commands(synthetic_root, tmp_path)["localize.py"] + ["--efficient_ram_testing"]
    localize.main(localize.parse_localize_arguments(argv))
    assert started == [str(tmp_path / "out")]
    assert len(open(tmp_path / "out" / "predictions.jsonl").read().splitlines()) > 0
    assert not os.path.exists(tmp_path / "out" / "dense_features")


# ------------------------------------------------------------------------------------------------
# 6. A resume with another number of processes is logged
# ------------------------------------------------------------------------------------------------


def test_a_resume_with_another_number_of_processes_is_logged(tmp_path, tiny_model, caplog):
    import checkpoints
    import mining
    import parser
    import train

    argv = ["--datasets_folder", str(tmp_path), "--backbone", "vit_tiny", "--backbone_depth", "2", "--device", "cpu"]
    args = parser.parse_arguments(argv)
    path = str(tmp_path / "last_model.pth")
    tiny_model.freeze()
    optimizer = torch.optim.Adam([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-5)
    saved = train.training_flags(args, world_size=2)
    checkpoints.save_checkpoint(path, model=tiny_model, optimizer=optimizer, extra={train.FLAGS_KEY: saved})
    for world_size, logged in ((2, False), (1, True), (4, True)):
        caplog.clear()
        with caplog.at_level("INFO"):
            train.resume_from(
                path,
                model=tiny_model,
                optimizer=optimizer,
                miner_state=mining.MiningState(4),
                flags=train.training_flags(args, world_size=world_size),
            )
        said = f"processes (torchrun) 2 -> {world_size}" in caplog.text and "within float rounding" in caplog.text
        assert said == logged, caplog.text


def test_peer_problems_name_the_failed_the_killed_and_the_stopped_ranks(tmp_path):
    """What rank 0 says about the others at the end of a failed job (per rank: torchrun's error file, the
    note of a rank that stopped on a signal, the process state on this machine)."""
    import distributed

    me = leftovers.this_process()
    gone = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(3)]
    for p in gone:
        p.wait()
    frozen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(frozen.pid, signal.SIGSTOP)
        while leftovers.process_state(frozen.pid) != "T":
            time.sleep(0.05)
        files = []
        for rank in range(6):
            (tmp_path / str(rank)).mkdir()
            files.append(str(tmp_path / str(rank) / "error.json"))
        (tmp_path / "1" / "error.json").write_text(
            json.dumps({"message": {"message": "ValueError: bad image x.jpg\nmore", "extraInfo": {}}})
        )
        (tmp_path / "3" / commons.STOP_NOTE).write_text("SIGTERM")  # ended on a signal, as rank 0 did
        pids = [os.getpid(), gone[0].pid, gone[1].pid, gone[2].pid, frozen.pid, gone[0].pid]
        hosts = [me.host] * 5 + ["0" * 8 if me.host != "0" * 8 else "1" * 8]  # rank 5: another machine
        peers = [
            commons.Peer(rank=r, owner=leftovers.Owner(pid=pid, boot=me.boot, host=host), error_file=files[r])
            for r, (pid, host) in enumerate(zip(pids, hosts))
        ]
        run = commons._Run(distributed.Context(rank=0, world_size=6), peers, timeout_s=5.0, wait_s=900.0)
        problems = commons.peer_problems(run, commons._peer_states(run))
    finally:
        frozen.kill()
        frozen.wait()
    assert problems == [
        (f"rank 1 (process {gone[0].pid})", "failed: ValueError: bad image x.jpg"),
        (
            f"rank 2 (process {gone[1].pid})",
            "ended without an error message (killed: kill -9, the out-of-memory killer, or a crash)",
        ),
        (
            f"rank 4 (process {frozen.pid})",
            f"is stopped (SIGSTOP, Ctrl-Z or a debugger; `kill -CONT {frozen.pid}` resumes it)",
        ),
    ]
    assert commons._error_file_message(str(tmp_path / "missing.json")) is None
