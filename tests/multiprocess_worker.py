"""One of N processes on 127.0.0.1 (tests/test_multiprocess.py starts them), or a single process
with several host devices: split computations equal one process on the whole batch.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/multiprocess_worker.py PORT I N [INIT_TIMEOUT_S]

runs as process I of N, its coordinator at 127.0.0.1:PORT; with N=1 it runs alone, without
`jax.distributed`, and checks only the sweep. Every check prints a line; the last is "worker ok".
"""

import os
import sys
import time
import traceback

assert "--xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402

port, process_id, num_processes = (int(a) for a in sys.argv[1:4])
# The start-up timeout also bounds gloo's set-up of each new group of devices, which waits for the
# slowest process (here process 0, which alone computes the references): generous by default.
init_timeout = int(sys.argv[4]) if len(sys.argv) > 4 else 300
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = f"127.0.0.1:{port}"
    # Bounded failures: a missing peer ends this process after init_timeout, a dead one after 10 s;
    # binding the loopback address only keeps the coordinator off every other interface.
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id,
                               coordinator_bind_address=address, initialization_timeout=init_timeout,
                               heartbeat_timeout_seconds=10, shutdown_timeout_seconds=30)

import chex  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jaxbptt as jb  # noqa: E402
from steps import problem  # noqa: E402

# Float64 all the way: gloo's CPU collectives reduce float64 as it is, so split and whole-batch
# results differ only by summation order.
RTOL, ATOL = 1e-10, 1e-13
# A mesh over jax.devices() lists each process's devices together, so with the batch split over it
# process i holds the i-th block of rows. Auto axes: jit partitions the unannotated programs.
mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
rank, procs = jax.process_index(), jax.process_count()
START = time.time()


def global_array(tree, spec, mesh=mesh, split="data"):
    """This process's block of a whole-batch value (or whole sequence, split along `split`),
    assembled into one array over all processes."""

    def one(a):
        axis = spec.index(split) if split in spec else None
        if axis is None:
            return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(a), a.shape)
        rows = a.shape[axis] // procs
        local = jax.lax.slice_in_dim(a, rank * rows, (rank + 1) * rows, axis=axis)
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(local), a.shape)

    return jax.tree.map(one, tree)


def on_first(reference, *args):
    """The whole-batch reference, computed by process 0 only (the others would compile it again)."""
    return jax.jit(reference)(*args) if rank == 0 else None


def check(name, got, want):
    got = jax.tree.map(lambda a: multihost_utils.process_allgather(a, tiled=True), got)  # every process gathers
    if rank == 0:
        chex.assert_trees_all_close(got, want, rtol=RTOL, atol=ATOL)
    cpu, wall = time.process_time(), time.time() - START
    print(f"process {rank}/{procs}: {name} ok ({cpu:.0f} s of CPU, {wall:.0f} s so far)", flush=True)


def check_data_parallel():
    options = dict(truncation=(2, 5), clip_norm=0.5, diagnostics=True, remat=4)
    step, loss_fn, params, carry, xs, targets = problem("lstm", T=9, B=4)
    want = on_first(jb.value_and_grad(step, loss_fn, **options), params, carry, xs, targets)
    f = jax.jit(jb.data_parallel(step, loss_fn, mesh, reduce="mean", **options))
    got = f(global_array(params, P()), global_array(carry, P("data")),
            global_array(xs, P(None, "data")), global_array(targets, P(None, "data")))
    check(f"data_parallel lstm {options}", got, want)


def check_training():
    """Two steps of gradients with chunked truncation and clipping, averaged over the processes."""
    step, loss_fn, params, carry, xs, targets = problem("elman", T=7, B=4)
    opt = optax.adam(1e-2)
    train_step = jax.jit(jb.make_train_step(step, loss_fn, opt, truncation=3, clip_norm=0.05))

    def train(params, carry, xs, targets):
        opt_state = opt.init(params)
        for _ in range(2):
            params, opt_state, loss, final = train_step(params, opt_state, carry, xs, targets)
        return params, opt_state, loss, final

    want = on_first(train, params, carry, xs, targets)
    got = train(global_array(params, P()), global_array(carry, P("data")), global_array(xs, P(None, "data")),
                global_array(targets, P(None, "data")))
    check("make_train_step, 2 steps", got, want)


def check_online():
    step, loss_fn, params, carry, xs, targets = problem("elman", T=12, B=4)
    trainer = jb.online_tbptt(step, loss_fn, optax.sgd(0.05), truncation=(3, 5), clip_norm=1.0)
    update = jax.jit(trainer.update)

    def stream(state, xs, targets):  # the stream in two calls: the state carries over
        state, first = update(state, xs[:6], targets[:6])
        state, second = update(state, xs[6:], targets[6:])
        return state, jnp.concatenate([first, second])

    want = on_first(stream, trainer.init(params, carry), xs, targets)
    state = trainer.init(global_array(params, P()), global_array(carry, P("data")))
    got = stream(state, global_array(xs, P(None, "data")), global_array(targets, P(None, "data")))
    check("online_tbptt stream", got, want)


def check_time_split():
    """`linear_scan` with time split over all devices: process i holds the i-th stretch of the
    sequence, and the states and their cotangents cross processes through its all-gathers."""
    time_mesh = jax.make_mesh((jax.device_count(),), ("time",), axis_types=(jax.sharding.AxisType.Auto,))
    a, b, w = (jax.random.uniform(jax.random.key(i), (24, 3), minval=0.5) for i in range(3))
    h0 = jnp.ones(3)

    def grads(scan):
        return jax.value_and_grad(lambda a, b, h0, w: jnp.sum(scan(a, b, h0) * w), argnums=(0, 1, 2))

    def whole(a, b, h0):
        return jax.lax.scan(lambda h, ab: (ab[0] * h + ab[1],) * 2, h0, (a, b))[1]

    local = lambda a, b, h0: jb.linear_scan(a, b, h0, axis_name="time")
    split = jax.shard_map(local, mesh=time_mesh, in_specs=(P("time"), P("time"), P()), out_specs=P("time"))
    want = on_first(grads(whole), a, b, h0, w)
    put = lambda tree, spec: global_array(tree, spec, time_mesh, "time")
    got = jax.jit(grads(split))(put(a, P("time")), put(b, P("time")), put(h0, P()), put(w, P("time")))
    check(f"time-split linear_scan over {jax.device_count()} devices", got, want)


def sweep_problem():
    """A 16-run sweep (2 learning rates x 2 seeds x 2 clip norms x 2 truncation lengths)."""
    model = jb.with_readout(jb.elman(6), 1)
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    batches = lambda key: (model.initial_carry((4,), jnp.float64), *jb.tasks.adding(key, 4, 10, jnp.float64))

    def run(lr, params, seed, clip, k):
        train_step = jb.make_train_step(model.step, jb.tasks.weighted_mse, opt, clip_norm=clip, truncation=k)
        state = opt.init(params)
        state.hyperparams["learning_rate"] = lr
        params, _, losses = jb.train_loop(train_step, batches, 2)(params, state, jax.random.key(seed))
        return params, losses

    inits = [model.init(jax.random.key(s), 2, jnp.float64) for s in range(2)]  # outside vmap (see train_loop)
    lr, seed, clip, k = (a.ravel() for a in np.meshgrid([0.05, 0.2], [0, 1], [0.3, 2.0], [3, 10], indexing="ij"))
    params = jax.tree.map(lambda *a: jnp.stack(a)[seed], *inits)
    return run, (jnp.asarray(lr), params, jnp.asarray(seed), jnp.asarray(clip), jnp.asarray(k, jnp.int32))


def check_sweep():
    run, args = sweep_problem()
    want = on_first(jax.vmap(run), *args)
    got = jb.sharded_sweep(run)(*args)
    assert got[1].sharding.spec[0] == "sweep" and len(got[1].sharding.device_set) == jax.device_count()
    check(f"sharded_sweep, 16 runs over {jax.device_count()} devices", got, want)
    try:
        jb.sharded_sweep(run)(*jax.tree.map(lambda a: a[:6], args))
        raise AssertionError("6 runs over 4 devices did not raise")
    except ValueError as e:
        assert "6 configurations, which do not split evenly over the 4 devices" in str(e), e


try:
    if num_processes > 1:
        assert jax.process_count() == num_processes and jax.local_device_count() == 2
        check_data_parallel()
        check_training()
        check_online()
        check_time_split()
    check_sweep()
except BaseException:
    # A failed check exits at once: a normal exit would wait at jax.distributed's shutdown barrier
    # for the peers, which may be waiting in a collective for this process.
    traceback.print_exc()
    sys.stdout.flush()
    os._exit(1)
print("worker ok", flush=True)
