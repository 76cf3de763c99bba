"""Run in its own process with 8 host devices (see test_sharding.py): sharded gradients equal
unsharded ones, with the batch split over the devices and with time split over them."""

import os

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import chex  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
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
print("batch ok")

# ---- time split over the 8 devices: linear_scan, the cells' parallel forms, deer -----------------
# Each sharded program is checked against the whole sequence on one device (lax.scan of the same
# recurrence or step), values and gradients, float64 at rtol 1e-12; every method in one program.
time_mesh = jax.make_mesh((8,), ("time",), axis_types=(jax.sharding.AxisType.Auto,))
RTOL, ATOL = 1e-12, 1e-13


def split_over_time(fn, in_specs, out_specs):
    return jax.shard_map(fn, mesh=time_mesh, in_specs=in_specs, out_specs=out_specs)


def close(got, want, rtol=RTOL, atol=ATOL):
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)


def scan_states(a, b, h0, reverse):
    """The oracle: lax.scan of h = a h + b, leaf by leaf."""
    def leaf(a, b, h0):
        a = jnp.broadcast_to(a, b.shape)
        return lax.scan(lambda h, ab: (ab[0] * h + ab[1],) * 2, h0, (a, b), reverse=reverse)[1]

    return jax.tree.map(leaf, a, b, h0)


def weighted(hs, w):
    return sum(jnp.sum(jnp.real(h * w_) + jnp.imag(h) ** 2) for h, w_ in zip(jax.tree.leaves(hs), jax.tree.leaves(w)))


T = 48


# Data from NumPy: each jax.random call would compile a program of its own (about a second each).
rng = np.random.default_rng(5)
normal = lambda *shape: jnp.asarray(rng.standard_normal(shape))
a = {"r": jnp.asarray(rng.uniform(0.5, 1.0, (T, 2))),  # real, varying over time
     "c": jnp.asarray(rng.uniform(0.5, 1.0, 3) * np.exp(1j * np.arange(3.0)))}  # complex, shared
b = {"r": normal(T, 2), "c": normal(T, 3) + 1j * normal(T, 3)}
h0 = {"r": normal(2), "c": normal(3) - 0.5j}
w = {"r": normal(T, 2), "c": normal(T, 3)}


def scan_loss(scan):  # both directions: the loss, the states and the gradients
    def loss(a, b, h0, w):
        hs = {r: scan(a, b, h0, r) for r in (False, True)}
        return weighted(hs[False], w) + weighted(hs[True], w) / 2, hs

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def time_split_scan(method, a_spec, h0_per_device=False):
    """With `h0_per_device`, `h0` holds an initial state per device and direction, shaped (8, 2, ...),
    of which the first device's starts the sequence (the last's with reverse=True)."""
    def scan(a, b, h0, reverse):
        def local(a, b, h0):
            h0 = jax.tree.map(lambda h: h[0, int(reverse)], h0) if h0_per_device else h0
            return jb.linear_scan(a, b, h0, reverse=reverse, method=method, axis_name="time")

        return split_over_time(local, (a_spec, P("time"), P("time") if h0_per_device else P()), P("time"))(a, b, h0)

    return scan


def padded_to_48(x, value):
    return jnp.concatenate([x[:45], jnp.full((3,) + x.shape[1:], value, x.dtype)])


def pick(tree, keys):
    return {k: tree[k] for k in keys}


# Every method in one program, both directions, each on its own leaves (so the program compiles in a
# few seconds): associative on the complex leaf with a shared decay (and an initial state given per
# device, of which only the first's, or the last's in reverse, counts), sequential on the pytree, and
# chunked on the real leaf cut to 45 steps, which 8 does not divide, padded as the docstring says
# (identity steps a = 1, b = 0 at the end, which keep the first 45 states and the final ones exact).
def every_method(a, b, h0, w):
    # h0 per device and direction: the first device holds the forward one and the last the reverse one;
    # the other entries must be ignored, and get no gradient
    h0_c = jnp.full((8, 2, 3), 1e3 + 0j).at[0, 0].set(h0["c"]).at[-1, 1].set(h0["c"])
    (loss, hs), (da, db, dh0) = scan_loss(time_split_scan("associative", {"c": P()}, h0_per_device=True))(
        pick(a, "c"), pick(b, "c"), {"c": h0_c}, pick(w, "c"))
    ignored = dh0["c"].at[0, 0].set(0).at[-1, 1].set(0)
    out = {"associative": ((loss, hs), (da, db, {"c": dh0["c"][0, 0] + dh0["c"][-1, 1]})), "ignored h0": ignored,
           "sequential": scan_loss(time_split_scan("sequential", {"r": P("time"), "c": P()}))(a, b, h0, w)}
    a_p, b_p, w_p = ({"r": padded_to_48(x["r"], value)} for x, value in ((a, 1.0), (b, 0.0), (w, 0.0)))
    (_, hs), (da, db, dh0) = scan_loss(time_split_scan("chunked", {"r": P("time")}))(a_p, b_p, pick(h0, "r"), w_p)
    out["chunked"] = (hs[False]["r"][:45], hs[True]["r"][:45], hs[False]["r"][-1], hs[True]["r"][0],
                      da["r"][:45], db["r"][:45], dh0["r"])
    return out


def references(a, b, h0, w):
    (_, hs), (da, db, dh0) = scan_loss(scan_states)(*({"r": x["r"][:45]} for x in (a, b)), pick(h0, "r"),
                                                    {"r": w["r"][:45]})
    return {"associative": scan_loss(scan_states)(*(pick(x, "c") for x in (a, b, h0, w))),
            "sequential": scan_loss(scan_states)(a, b, h0, w),
            "chunked": (hs[False]["r"], hs[True]["r"], hs[False]["r"][-1], hs[True]["r"][0], da["r"], db["r"], dh0["r"])}


got, want = jax.jit(every_method)(a, b, h0, w), jax.jit(references)(a, b, h0, w)
for method in ("associative", "chunked", "sequential"):
    close(got[method], want[method])
    print("time-split linear_scan", method, "ok")
assert not np.any(got["ignored h0"])
try:  # shard_map refuses the unpadded length
    jax.jit(split_over_time(lambda b: jb.linear_scan(0.5, b, 0.0, axis_name="time"), P("time"), P("time")))(b["r"][:45, 0])
    raise AssertionError("a length 8 does not divide was not refused")
except ValueError as e:
    assert "8 does not evenly divide 45" in str(e), e
print("time-split linear_scan: 45 steps refused, padded to 48 ok")


# The cells' parallel forms and DEER, split over time, against lax.scan of their steps on one device,
# in one program (minLSTM's parallel form is minGRU's with other coefficients; float32, minLSTM and
# quasi-DEER run on a one-device mesh in the main test process).
def random_params(cell, inputs):
    """Parameters of `cell.init`'s shapes, standard normal / 2 (any values keep these cells stable)."""
    return jax.tree.map(lambda s: normal(*s.shape) / 2, jax.eval_shape(lambda key: cell.init(key, inputs), jax.random.key(0)))


def cell_problem(cell, width):
    carry = cell.initial_carry((2,), jnp.float64) + 0.3
    return random_params(cell, 3), carry, normal(24, 2, 3), normal(24, 2, width)


CELLS = {"lru": (jb.lru(4, 0.5, 0.99), 3), "mingru": (jb.mingru(4), 4)}  # cell, output width
DEER = {"DEER gru": (jb.gru(3), False)}  # quasi-DEER's solve is linear_scan, checked above


def cell_loss(form):  # form(params, carry, xs, targets) -> (sum of the per-step losses, final, ys)
    def loss(params, carry, xs, targets):
        total, final, ys = form(params, carry, xs, targets)
        return total + jnp.sum(jnp.abs(final) ** 2), (final, ys)

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def mse_sum(ys, targets):
    return jnp.sum((ys - targets) ** 2)


def time_split_cells(problems, deer_params, deer_xs, deer_w):
    out = {}
    for name, (cell, _) in CELLS.items():
        def local(params, carry, xs, targets, cell=cell):
            final, ys = cell.parallel(params, carry, xs, axis_name="time")
            return lax.psum(mse_sum(ys, targets), "time"), final, ys

        form = split_over_time(local, (P(), P(), P("time"), P("time")), (P(), P(), P("time")))
        out[name] = cell_loss(form)(*problems[name])
    for name, (cell, quasi) in DEER.items():
        def local(params, xs, w, cell=cell, quasi=quasi):
            final, ys, info = jb.deer(cell.step, params, cell.initial_carry((), jnp.float64) + 0.1, xs, quasi=quasi,
                                      tol=0.0, return_info=True, axis_name="time")
            return lax.psum(jnp.sum(ys * w), "time"), final, ys, info.iterations

        form = split_over_time(local, (P(), P("time"), P("time")), (P(), P(), P("time"), P()))
        def loss(params, xs, w, form=form):
            total, final, ys, iterations = form(params, xs, w)
            return total + jnp.sum(final ** 2), (final, ys, iterations)

        grads, (final, ys, iterations) = jax.grad(loss, argnums=(0, 1), has_aux=True)(deer_params[name], deer_xs, deer_w)
        out[name] = (final, ys, grads), iterations
    return out


def scanned_cells(problems, deer_params, deer_xs, deer_w):
    out = {}
    for name, (cell, _) in CELLS.items():
        def form(params, carry, xs, targets, cell=cell):
            final, ys = lax.scan(lambda c, x: cell.step(params, c, x), carry, xs)
            return mse_sum(ys, targets), final, ys

        out[name] = cell_loss(form)(*problems[name])
    for name, (cell, _) in DEER.items():
        def form(params, xs, w, cell=cell):
            final, ys = lax.scan(lambda c, x: cell.step(params, c, x), cell.initial_carry((), jnp.float64) + 0.1, xs)
            return jnp.sum(ys * w) + jnp.sum(final ** 2), (final, ys)

        grads, (final, ys) = jax.grad(form, argnums=(0, 1), has_aux=True)(deer_params[name], deer_xs, deer_w)
        out[name] = final, ys, grads
    return out


problems = {name: cell_problem(cell, width) for name, (cell, width) in CELLS.items()}
deer_params = {name: random_params(cell, 2) for name, (cell, _) in DEER.items()}
deer_xs, deer_w = normal(24, 2), normal(24, 3)
got = jax.jit(time_split_cells)(problems, deer_params, deer_xs, deer_w)
want = jax.jit(scanned_cells)(problems, deer_params, deer_xs, deer_w)
for name in CELLS:
    close(got[name], want[name])
    print("time-split", name, "parallel ok")
for name in DEER:
    (final, ys, grads), iterations = got[name]
    close((final, ys, grads), want[name], 1e-10, 1e-12)  # DEER stops at the sequential answer up to rounding
    assert 1 <= int(iterations) <= 24, iterations
    print("time-split", name, f"ok ({int(iterations)} iterations)")
print("sharded ok")
