"""Beyond one process: two processes on 127.0.0.1, each with two host devices, equal one process on
the whole batch (tests/multiprocess_worker.py), a sequence split over their four devices along time
equals the whole sequence, and a sweep split over them equals the unsplit sweep; a missing peer or a
taken port is an error within seconds, not a hang."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import jaxbptt as jb

HERE = pathlib.Path(__file__).resolve().parent
WORKER = str(HERE / "multiprocess_worker.py")
TIMEOUT_S = 540  # a bound, not a target: a healthy pair takes well under it


def free_port() -> int:
    with socket.socket() as s:  # port 0: the kernel picks a free port on the loopback address
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def launch():
    """Starts worker processes; every one of them is killed at the end of the test, whatever happens."""
    started = []

    def start(port, process_id, num_processes, devices=2, init_timeout_s=300):
        env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}",
                   PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
        argv = [sys.executable, "-u", WORKER, *map(str, (port, process_id, num_processes, init_timeout_s))]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            # SIGKILL: jax.distributed handles SIGTERM (preemption notices) and would keep running
            proc.kill()
            proc.communicate()


def output(proc, timeout=TIMEOUT_S):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"worker still running after {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


def test_two_processes_equal_one(launch):
    port = free_port()
    procs = [launch(port, i, 2) for i in range(2)]
    for i, proc in enumerate(procs):
        code, out = output(proc)
        assert code == 0 and "worker ok" in out, f"process {i} exited {code}:\n{out[-4000:]}"
        if i == 0:  # process 0 compares every result against the whole batch
            for check in ("data_parallel lstm", "make_train_step", "online_tbptt",
                          "time-split linear_scan over 4 devices", "sharded_sweep, 16 runs over 4 devices"):
                assert check in out, out[-4000:]


def test_missing_peer_and_taken_port_fail_within_seconds(launch):
    # process 0 of 2 alone: its peer never registers, so it stops after initialization_timeout
    alone = launch(free_port(), 0, 2, init_timeout_s=3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        code, out = output(launch(taken_port, 0, 2, init_timeout_s=3), timeout=120)
    # JAX then raises "Failed to start RPC server", or the process dies of a signal before printing it
    assert code != 0 and "Failed to add port to server" in out and str(taken_port) in out, out[-4000:]
    code, out = output(alone, timeout=180)
    assert code != 0 and "DEADLINE_EXCEEDED" in out and "RegisterTask" in out, out[-4000:]


def test_sharded_sweep_equals_vmap_on_one_device():
    run = lambda lr, w: (w - lr * 2 * w, jnp.sum(w) * lr)
    lrs, w = jnp.linspace(0.1, 0.4, 4), jnp.ones(3)
    got = jb.sharded_sweep(run, in_axes=(0, None))(lrs, w)
    want = jax.vmap(run, in_axes=(0, None))(lrs, w)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.allclose(a, b, rtol=1e-12)), got, want))
    mesh = jax.make_mesh((1,), ("runs",))
    got = jax.jit(jb.sharded_sweep(run, mesh=mesh, axis_name="runs", in_axes=(0, None)))(lrs, w)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.allclose(a, b, rtol=1e-12)), got, want))


def test_sharded_sweep_bad_input():
    run = lambda lr, w: w * lr
    with pytest.raises(TypeError, match=r"run must be callable"):
        jb.sharded_sweep(3)
    with pytest.raises(ValueError, match=r"in_axes entries must be 0 \(swept\) or None \(shared\); got in_axes=\(1, N"):
        jb.sharded_sweep(run, in_axes=(1, None))
    with pytest.raises(ValueError, match=r"axis_name 'runs' is not an axis of the mesh; its axes are \('sweep',\)"):
        jb.sharded_sweep(run, mesh=jax.make_mesh((1,), ("sweep",)), axis_name="runs")
    swept = jb.sharded_sweep(run)
    with pytest.raises(ValueError, match=r"same number of configurations along axis 0; got args\[0\]: 4, args\[1\]: 3"):
        swept(jnp.ones(4), jnp.ones(3))
    with pytest.raises(ValueError, match=r"in_axes has 2 entries but swept was called with 1 arguments"):
        jb.sharded_sweep(run, in_axes=(0, None))(jnp.ones(4))
