"""Run in its own process with 8 host devices (see test_sharding.py): sharded gradients equal
unsharded ones."""

import os

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import chex  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jaxbptt as jb  # noqa: E402
from steps import problem  # noqa: E402

assert jax.device_count() == 8
mesh = jax.make_mesh((8,), ("data",))
# jit over NamedSharding inputs lets XLA partition the program: a mesh with Auto axes (explicit
# axes make every reshape of a split axis name its output sharding)
auto_mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

# a sweep's results are ordinary arrays: indexed, sliced and reshaped (not refused as explicitly sharded)
sweep = jb.sharded_sweep(lambda lr, w: w - lr * 2 * w, in_axes=(0, None))(jnp.arange(8.0), jnp.float64(1.0))
chex.assert_trees_all_close((sweep[0], sweep[2:4], sweep.reshape(2, 4)),
                            (1.0, 1 - 2 * jnp.arange(2.0, 4.0), (1 - 2 * jnp.arange(8.0)).reshape(2, 4)), rtol=1e-12)

# a generic step and a hand-written kernel, each with options (tests/test_multiprocess.py splits an LSTM)
for name, options in [("two_layer", dict(truncation=(3, 7), clip_norm=0.05)),
                      ("gru", dict(remat=4, clip_norm=0.02, diagnostics=True))]:
    step, loss_fn, params, carry, xs, targets = problem(name, T=19, B=16)
    reference = jax.jit(jb.value_and_grad(step, loss_fn, **options))(params, carry, xs, targets)

    # 1. shard_map: each device reverses its shard; the loss averages over the batch, so the shards'
    #    losses and gradients are averaged across devices
    sharded = jax.jit(jb.data_parallel(step, loss_fn, mesh, reduce="mean", **options))(params, carry, xs, targets)
    chex.assert_trees_all_close(sharded, reference, rtol=1e-10, atol=1e-13)

    # 2. jit with NamedSharding inputs: XLA partitions the same program over the batch
    put = lambda tree, spec: jax.tree.map(lambda a: jax.device_put(a, NamedSharding(auto_mesh, spec)), tree)
    args = (put(params, P()), put(carry, P("data")), put(xs, P(None, "data")), put(targets, P(None, "data")))
    partitioned = jax.jit(jb.value_and_grad(step, loss_fn, **options))(*args)
    chex.assert_trees_all_close(partitioned, reference, rtol=1e-10, atol=1e-13)
    print(name, options, "ok")

# a loss summed over the batch uses reduce="sum"
step, _, params, carry, xs, targets = problem("elman", T=9, B=16)
sum_loss = lambda y, t: jnp.sum((y - t) ** 2)
reference = jb.value_and_grad(step, sum_loss, clip_norm=0.5)(params, carry, xs, targets)
chex.assert_trees_all_close(jax.jit(jb.data_parallel(step, sum_loss, mesh, clip_norm=0.5))(params, carry, xs, targets),
                            reference, rtol=1e-10, atol=1e-13)
print("sharded ok")
