"""Data parallelism over the batch with `jax.shard_map`: each device runs the reverse scan on its
shard of the batch, and the loss and parameter gradients are summed (or averaged) across devices."""

from __future__ import annotations

from typing import Callable

import jax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .._core.api import value_and_grad
from .._types import LossFn, StepFn


def data_parallel(
    step: StepFn,
    loss_fn: LossFn,
    mesh: Mesh,
    axis_name: str = "data",
    *,
    reduce: str = "sum",
    **options,
) -> Callable:
    """`jaxbptt.value_and_grad` with the batch split across the devices of `mesh`'s `axis_name`.

    Layout: every leaf of the carry has the batch as its leading axis; every leaf of `xs` and
    `targets` is time-major with the batch second, `(T, B, ...)`; params are replicated. Each device
    computes the loss and gradients of its shard with the hand-written reverse scan; one collective
    per call combines them (plus one per step for the global norms of `clip_norm` and
    diagnostics, which span the whole batch as in the unsplit computation). The batch must divide
    evenly across the devices.

    Args:
      step, loss_fn, **options: as in `jaxbptt.value_and_grad` (gradients with respect to params).
      mesh: a `jax.sharding.Mesh`; `axis_name` names the axis the batch is split over.
      reduce: `"sum"` when the sequence loss sums over the batch (the shards' losses and gradients
        add up), `"mean"` when `loss_fn` averages over the batch (equal shards: the mean of the
        shards' values is the whole batch's).

    Returns:
      A function `(params, carry, xs, targets) -> ((loss, final_carry), grads)`, to jit; `loss` and
      `grads` are replicated, `final_carry` stays split over the batch.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> model = jb.with_readout(jb.gru(8), 1)
      >>> f = jax.jit(jb.data_parallel(model.step, lambda y, t: jnp.sum((y - t) ** 2), mesh))
      >>> params = model.init(jax.random.key(0), 2)
      >>> xs, ts = jnp.ones((5, 4, 2), jnp.float32), jnp.zeros((5, 4, 1), jnp.float32)
      >>> (loss, final), grads = f(params, model.initial_carry((4,)), xs, ts)
      >>> final.shape
      (4, 8)
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean'; got reduce={reduce!r}.")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh; its axes are {mesh.axis_names}.")
    if options.get("argnums", 0) != 0:
        raise ValueError("data_parallel computes gradients with respect to params only (argnums=0).")
    shards = mesh.shape[axis_name]
    # A batch-mean loss is each shard's mean divided by the number of shards: then every cotangent,
    # and so every clipping decision, equals the unsplit computation's.
    local_loss = loss_fn if reduce == "sum" else (lambda y, t: loss_fn(y, t) / shards)
    local = value_and_grad(step, local_loss, axis_name=axis_name, **options)

    def shard(params, carry, xs, targets):
        aux, grads = local(params, carry, xs, targets)
        loss, final, *diag = aux
        return (lax.psum(loss, axis_name), final, *diag), lax.psum(grads, axis_name)

    batch, time_major = P(axis_name), P(None, axis_name)
    diag = (P(),) if options.get("diagnostics") else ()
    specs = (P(), batch, time_major, time_major)
    mapped = jax.shard_map(shard, mesh=mesh, in_specs=specs, out_specs=((P(), batch, *diag), P()), check_vma=False)

    def data_parallel_fn(params, carry, xs, targets):
        # Lay the inputs out as the specs say (a no-op when they already are; needed on meshes
        # with explicit axes, where shard_map checks the inputs' shardings).
        args = [jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, spec)), arg)
                for arg, spec in zip((params, carry, xs, targets), specs)]
        return mapped(*args)

    return data_parallel_fn
