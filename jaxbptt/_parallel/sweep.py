"""Sweeps at scale: `jax.vmap` over configurations, the sweep axis split over every device of every
process, each device running its share as one vmapped call."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .. import _validate as v


def sharded_sweep(
    run: Callable,
    *,
    mesh: Optional[Mesh] = None,
    axis_name: str = "sweep",
    in_axes: Union[int, None, Sequence[Optional[int]]] = 0,
) -> Callable:
    """`jax.vmap(run, in_axes)` with the sweep axis split over the devices of a 1-D mesh.

    Each configuration of a sweep (a learning rate, a seed's initial parameters, a clip norm, a
    truncation length: any pytree leaves `run` takes) is one row of the sweep axis, axis 0 of every
    swept leaf. With D devices on the mesh and N configurations, each device runs its N / D rows as
    one vmapped call, with no communication between devices; the result equals `jax.vmap(run,
    in_axes)` on the whole sweep. Roughly::

      outputs = stack([run(*configuration) for configuration in sweep])     # computed D ways at once

    Across processes (`jax.distributed.initialize`), the default mesh spans `jax.devices()`, all
    devices of all processes; every process calls the returned function with the same (whole)
    arguments and computes only the rows of its own devices. Read the rows of other processes with
    `jax.experimental.multihost_utils.process_allgather(outputs)`.

    Args:
      run: a function of the configuration, jit- and vmap-able (e.g. a `jaxbptt.train_loop` run).
      mesh: a mesh with an axis `axis_name`; default: a 1-D mesh over `jax.devices()`.
      axis_name: the mesh axis the sweep is split over.
      in_axes: per positional argument, 0 (swept: one row per configuration) or None (shared by
        every configuration, replicated); an int or None applies to all arguments.

    Returns:
      `swept(*args) -> outputs`, jit-compiled, with every output leaf stacked along axis 0 (one row
      per configuration) and split over the mesh as the inputs are; ordinary arrays (the mesh's
      axes are used as `AxisType.Auto`), so `outputs[0]` is the first configuration's result.

    Raises:
      ValueError: an `in_axes` entry other than 0 or None, an `axis_name` missing from the mesh; and,
        when called, swept leaves whose axis 0 lengths differ or do not divide evenly over the devices.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> run = lambda lr, w: w - lr * 2 * w                 # one gradient step of w ** 2
      >>> swept = jb.sharded_sweep(run, in_axes=(0, None))
      >>> [round(v, 6) for v in swept(jnp.array([0.1, 0.2, 0.3, 0.4]), jnp.float32(1.0)).tolist()]
      [0.8, 0.6, 0.4, 0.2]
    """
    v.check_callable("run", run)
    if mesh is None:
        mesh = jax.make_mesh((jax.device_count(),), (axis_name,))
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh; its axes are {mesh.axis_names}.")
    # Arrays split over Explicit mesh axes (jax.make_mesh's default) refuse plain indexing and reshapes
    # (`outputs[0]` raises a ShardingTypeError); a sweep's results are read as ordinary arrays.
    mesh = mesh.update(axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    entries = in_axes if isinstance(in_axes, (tuple, list)) else None
    for axis in (entries if entries is not None else (in_axes,)):
        if axis is not None and (isinstance(axis, bool) or axis != 0):
            raise ValueError(f"in_axes entries must be 0 (swept) or None (shared); got in_axes={in_axes!r}.")
    devices = mesh.shape[axis_name]
    compiled = {}

    def swept(*args):
        axes = tuple(entries) if entries is not None else (in_axes,) * len(args)
        if len(axes) != len(args):
            raise ValueError(f"in_axes has {len(axes)} entries but swept was called with {len(args)} arguments.")
        lengths = {f"args[{i}]{jax.tree_util.keystr(path)}": np.shape(leaf)[0] if np.ndim(leaf) else None
                   for i, (arg, axis) in enumerate(zip(args, axes)) if axis == 0
                   for path, leaf in jax.tree_util.tree_leaves_with_path(arg)}
        if not lengths or len(set(lengths.values())) != 1 or None in lengths.values():
            listing = ", ".join(f"{k}: {n}" for k, n in lengths.items()) or "no swept leaf"
            raise ValueError(f"every swept leaf needs the same number of configurations along axis 0; got {listing}.")
        count = next(iter(lengths.values()))
        if count % devices:
            raise ValueError(f"the sweep has {count} configurations, which do not split evenly over the {devices} "
                             f"devices of mesh axis {axis_name!r}; use a multiple of {devices}.")
        specs = tuple(P(axis_name) if axis == 0 else P() for axis in axes)
        # Same arguments on every process: each places only the rows of its own devices.
        placed = [jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, spec)), arg)
                  for arg, spec in zip(args, specs)]
        if specs not in compiled:
            mapped = jax.shard_map(jax.vmap(run, in_axes=axes), mesh=mesh, in_specs=specs, out_specs=P(axis_name),
                                   check_vma=False)
            compiled[specs] = jax.jit(mapped)
        return compiled[specs](*placed)

    return swept
