"""`linear_scan` against a sequential `lax.scan` of the same recurrence, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import jaxbptt as jb

T, B, H = 13, 3, 4


def sequential(a, b, h0, reverse=False):
    def one(a_, b_, h_):
        a_ = jnp.broadcast_to(a_, b_.shape)

        def body(h, ab):
            h = ab[0] * h + ab[1]
            return h, h

        return lax.scan(body, h_, (a_, b_), reverse=reverse)[1]

    return jax.tree.map(one, a, b, h0)


def _data(seed, complex_=False, a_shape=(T, B, H)):
    ks = jax.random.split(jax.random.key(seed), 6)
    a = jax.random.uniform(ks[0], a_shape, minval=0.5, maxval=1.0)
    b = jax.random.normal(ks[1], (T, B, H))
    h0 = jax.random.normal(ks[2], (B, H))
    if complex_:
        a = a * jnp.exp(1j * jax.random.uniform(ks[3], a_shape, maxval=6.0))
        b = b + 1j * jax.random.normal(ks[4], (T, B, H))
        h0 = h0 + 1j * jax.random.normal(ks[5], (B, H))
    return a, b, h0


def _loss(scan, reverse):
    def loss(a, b, h0):
        hs = scan(a, b, h0, reverse=reverse)
        w = jnp.cos(jnp.arange(hs.size, dtype=jnp.float64).reshape(hs.shape))
        return jnp.sum(jnp.real(hs * w) + jnp.imag(hs) ** 2)

    return loss


METHODS = ("associative", "chunked", "sequential")


def _method(method):
    return lambda a, b, h0, reverse=False: jb.linear_scan(a, b, h0, reverse=reverse, method=method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("complex_, reverse, a_shape", [
    (False, False, (T, B, H)), (True, True, (T, B, H)), (True, False, (H,)), (False, True, (T, 1, H)),
])
def test_values_and_grads_match_sequential_scan(complex_, reverse, a_shape, method):
    a, b, h0 = _data(0, complex_, a_shape)
    scan = _method(method)
    np.testing.assert_allclose(scan(a, b, h0, reverse=reverse), sequential(a, b, h0, reverse),
                               rtol=1e-12, atol=1e-12)
    got = jax.jit(jax.grad(_loss(scan, reverse), argnums=(0, 1, 2)))(a, b, h0)
    want = jax.jit(jax.grad(_loss(sequential, reverse), argnums=(0, 1, 2)))(a, b, h0)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_real_decay_with_complex_inputs_gets_a_real_gradient():
    a, _, _ = _data(1, False)
    _, b, h0 = _data(1, True)
    got = jax.jit(jax.grad(_loss(jb.linear_scan, False)))(a, b, h0)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, jax.jit(jax.grad(_loss(sequential, False)))(a, b, h0), rtol=1e-10)


def test_pytree_of_leaves():
    a1, b1, h1 = _data(2)
    a2, b2, h2 = _data(3, True)
    a, b, h0 = {"x": a1, "y": a2[:, 0]}, {"x": b1, "y": b2[:, 0]}, {"x": h1, "y": h2[0]}
    got = jb.linear_scan(a, b, h0)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-12), got, sequential(a, b, h0))


@pytest.mark.parametrize("method", METHODS)
def test_check_grads(method):
    a, b, h0 = _data(4, True)
    f = jax.jit(lambda a, b, h0: jb.linear_scan(a, b, h0, reverse=True, method=method))
    check_grads(f, (a[:6, 0], b[:6, 0], h0[0]), order=1, modes=["rev"])


@pytest.mark.parametrize("length, chunk", [(13, 4), (1, 4)])
def test_chunk_boundaries(monkeypatch, length, chunk):
    """T not a multiple of the chunk (identity steps pad the last chunk), T=1 (shorter than a chunk): both
    directions of a real and a complex leaf in one loss, against the sequential scan."""
    monkeypatch.setattr("jaxbptt._parallel.linear_scan._chunk_length", lambda _: chunk)
    real, cplx = _data(7), _data(8, True)
    args = tuple({"r": r[:length, 0], "c": c[:length, 0, :2]} for r, c in zip(real[:2], cplx[:2]))
    args += ({"r": real[2][0], "c": cplx[2][0, :2]},)

    def loss(scan):
        def total(a, b, h0):
            hs = {r: scan(a, b, h0, reverse=r) for r in (False, True)}
            return sum(_loss(lambda *_, reverse: hs[reverse][k], r)(a, b, h0) for k in ("r", "c") for r in hs)

        return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))

    got, want = loss(_method("chunked"))(*args), loss(sequential)(*args)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12), got, want)


@pytest.mark.parametrize("method", METHODS)
def test_vmap_over_a_decay_hyperparameter(method):
    _, b, h0 = _data(5)
    decays = jnp.array([0.3, 0.9, 0.99])

    def loss(lam, scan):
        return jnp.sum(scan(jnp.full((H,), lam), b, h0) ** 2)

    got = jax.jit(jax.vmap(jax.value_and_grad(lambda lam: loss(lam, _method(method)))))(decays)
    want = jax.jit(jax.vmap(jax.value_and_grad(lambda lam: loss(lam, sequential))))(decays)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-10)


def test_zero_length():
    hs = jb.linear_scan(jnp.ones((0, 2)), jnp.ones((0, 2)), jnp.zeros(2))
    assert hs.shape == (0, 2)


def test_float32_close_to_float64():
    a, b, h0 = _data(6)
    got = jax.jit(jb.linear_scan)(*(x.astype(jnp.float32) for x in (a, b, h0)))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, sequential(a, b, h0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, error, match", [
    ((jnp.ones((3, 2)), jnp.ones((3, 2)), jnp.zeros(3)), ValueError, r"h0 must have the shape of one step of b"),
    ((jnp.ones((4, 2)), jnp.ones((3, 2)), jnp.zeros(2)), ValueError, r"a must broadcast against b"),
    ((jnp.ones((3, 2)), {"x": jnp.ones((3, 2))}, {"x": jnp.zeros(2)}), TypeError, r"a must have the pytree structure of b"),
    ((jnp.ones((3, 2)), jnp.ones((3, 2), jnp.int32), jnp.zeros(2)), TypeError, r"b must be a float or complex"),
    ((jnp.ones(()), jnp.ones(()), jnp.zeros(())), ValueError, r"b must have time as the leading axis"),
])
def test_errors(args, error, match):
    with pytest.raises(error, match=match):
        jb.linear_scan(*args)


def test_reverse_must_be_bool():
    with pytest.raises(TypeError, match="reverse must be a bool"):
        jb.linear_scan(jnp.ones(3), jnp.ones(3), jnp.zeros(()), reverse=1)


def test_method_must_be_known():
    with pytest.raises(ValueError, match="method must be one of 'auto', 'associative', 'chunked', 'sequential'; got 'serial'"):
        jb.linear_scan(jnp.ones(3), jnp.ones(3), jnp.zeros(()), method="serial")


def test_auto_picks_sequential_on_cpu():
    """On the CPU `auto` is one loop over time: no associative scan's log2(T) levels of slices."""
    jaxprs = {m: str(jax.make_jaxpr(_method(m))(jnp.ones(64), jnp.ones(64), jnp.zeros(()))) for m in METHODS + ("auto",)}
    assert jax.default_backend() == "cpu"
    assert jaxprs["auto"] == jaxprs["sequential"] != jaxprs["associative"]


def test_zero_decay_forgets_exactly_in_every_method():
    """Decays near the float range: the parallel methods' products of 1e200 * 1e200 overflow to inf,
    and a zero decay after them must still forget them exactly (0, not 0 * inf = NaN), as the
    sequential loop does; a NaN decay still gives NaN."""
    a = jnp.array([1e200] * 8 + [0.0] + [0.99] * 7)
    b = jnp.array([0.0] * 8 + [1.0] * 8)

    def run(scan):  # states, the gradient of a loss on the last steps, and the states after a NaN decay
        h0 = jnp.float64(0.0)
        grad = jax.grad(lambda a, b: jnp.sum(scan(a, b, h0)[-3:]), (0, 1))
        return jax.jit(lambda a, b: (scan(a, b, h0), grad(a, b), scan(a.at[2].set(jnp.nan), b, h0)))(a, b)

    want = run(sequential)
    assert np.isfinite(want[0]).all() and all(np.isfinite(g).all() for g in want[1]) and np.isnan(want[2][2:]).all()
    for method in METHODS:
        got = run(_method(method))
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-12), got, want)


def _split_over_time(fn, in_specs, out_specs, axis="time"):
    """`fn` under `jax.shard_map` on a one-device mesh (multi-device runs: tests/sharded_check.py)."""
    mesh = jax.make_mesh((1,), (axis,), axis_types=(jax.sharding.AxisType.Auto,))
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))


def test_time_split_on_one_device():
    """`axis_name` on a one-device mesh runs the split code with one slice: float32 under jit, vmap
    inside the shard, and check_grads of the split VJP (reverse, complex)."""
    from jax.sharding import PartitionSpec as P

    a, b, h0 = (x.astype(jnp.float32) for x in _data(9))
    split = _split_over_time(lambda a, b, h0: jb.linear_scan(a, b, h0, axis_name="time"), (P("time"),) * 2 + (P(),), P("time"))
    got = split(a, b, h0)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, sequential(a, b, h0), rtol=1e-6)
    h0s = jnp.stack([h0, 2 * h0])
    mapped = _split_over_time(lambda b, h0s: jax.vmap(lambda h: jb.linear_scan(0.9, b, h, axis_name="time"))(h0s),
                              (P("time"), P()), P(None, "time"))
    np.testing.assert_allclose(mapped(b, h0s), jax.vmap(lambda h: sequential(jnp.float32(0.9), b, h))(h0s), rtol=1e-6)
    a, b, h0 = _data(10, True)
    f = _split_over_time(lambda a, b, h0: jb.linear_scan(a, b, h0, reverse=True, axis_name="time"),
                         (P("time"),) * 2 + (P(),), P("time"))
    check_grads(f, (a[:6, 0], b[:6, 0], h0[0]), order=1, modes=["rev"])


def test_decay_replicated_over_a_split_batch():
    """A shared decay replicated (P()) while the batch is split: its gradient is the sum over devices,
    which needs the custom VJP's inputs cast to vary like its outputs."""
    from jax.sharding import PartitionSpec as P

    _, b, h0 = _data(11)
    lam = jnp.linspace(0.5, 0.9, H)
    split = _split_over_time(jb.linear_scan, (P(), P(None, "data"), P("data")), P(None, "data"), axis="data")
    got = jax.grad(lambda lam: jnp.sum(split(lam, b, h0) ** 2))(lam)
    np.testing.assert_allclose(got, jax.grad(lambda lam: jnp.sum(sequential(lam, b, h0) ** 2))(lam), rtol=1e-10)


def test_axis_name_must_be_bound():
    with pytest.raises(ValueError, match=r"linear_scan: axis_name 'time' is not a bound axis name here\. Call "
                                         r"linear_scan inside jax.shard_map"):
        jb.linear_scan(jnp.ones(3), jnp.ones(3), jnp.zeros(()), axis_name="time")
