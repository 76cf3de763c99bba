"""LRU, minGRU, minLSTM: `parallel` against `lax.scan` of `step` (values and gradients), and `step`
through the sequential engine's options against the oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import jaxbptt as jb

T, B, D, H = 16, 2, 3, 5
CELLS = {
    "lru": lambda: jb.lru(H, 0.5, 0.99),
    "mingru": lambda: jb.mingru(H),
    "minlstm": lambda: jb.minlstm(H),
}
mse = lambda y, t: jnp.mean((y - t) ** 2)


def _problem(name, dtype=jnp.float64):
    cell = CELLS[name]()
    params = cell.init(jax.random.key(0), D, dtype)
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    carry = cell.initial_carry((B,), dtype)
    carry = carry + (0.3 * jax.random.normal(k1, carry.shape, dtype)).astype(carry.dtype)
    if jnp.iscomplexobj(carry):
        carry = carry + 0.2j
    xs = jax.random.normal(k2, (T, B, D), dtype)
    out_width = D if name == "lru" else H
    targets = jax.random.normal(k3, (T, B, out_width), dtype)
    return cell, params, carry, xs, targets


def _sequential(cell):
    return lambda params, carry, xs: lax.scan(lambda c, x: cell.step(params, c, x), carry, xs)


def _loss(form):
    def loss(params, carry, xs, targets):
        final, ys = form(params, carry, xs)
        return jnp.sum(jax.vmap(mse)(ys, targets)) + jnp.sum(jnp.abs(final) ** 2)

    return loss


@pytest.mark.parametrize("name", CELLS)
def test_parallel_equals_scan_of_step(name):
    cell, params, carry, xs, targets = _problem(name)

    def both(form):  # outputs and gradients of one form, in one compiled program
        grad = jax.grad(_loss(form), argnums=(0, 1, 2))
        return jax.jit(lambda p, c, x, t: (form(p, c, x), grad(p, c, x, t)))(params, carry, xs, targets)

    (got, got_grads), (want, want_grads) = both(cell.parallel), both(_sequential(cell))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12), got, want)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_lru_parallel_check_grads():
    cell, params, carry, xs, _ = _problem("lru")
    f = jax.jit(lambda p, c, x: cell.parallel(p, c, x)[1])
    check_grads(f, (params, carry[0], xs[:6, 0]), order=1, modes=["rev"])


def test_parallel_under_vmap_over_a_hyperparameter():
    cell, params, carry, xs, targets = _problem("mingru")

    def loss(scale, form):
        return _loss(form)(jax.tree.map(lambda p: scale * p, params), carry, xs, targets)

    scales = jnp.array([0.5, 1.0, 2.0])
    got = jax.jit(jax.vmap(jax.grad(lambda s: loss(s, cell.parallel))))(scales)
    want = jax.jit(jax.vmap(jax.grad(lambda s: loss(s, _sequential(cell)))))(scales)
    np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize("name, options", [
    ("lru", dict(truncation=4, clip_norm=0.5)),
    ("mingru", dict(truncation=(3, 6))),
    ("minlstm", dict(clip_norm=0.1)),
])
def test_step_with_engine_options_matches_oracle(name, options):
    cell, params, carry, xs, targets = _problem(name)
    args = (params, carry, xs, targets)
    (loss, final), grads = jax.jit(jb.value_and_grad(cell.step, mse, argnums=(0, 1), **options))(*args)
    (loss_ref, final_ref), grads_ref = jb.reference_value_and_grad(cell.step, mse, argnums=(0, 1), **options)(*args)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-12)
    np.testing.assert_allclose(final, final_ref, rtol=1e-12)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12), grads, grads_ref)


def test_lru_diagnostics_and_remat_with_a_complex_carry():
    cell, params, carry, xs, targets = _problem("lru")
    f = jb.value_and_grad(cell.step, mse, clip_norm=0.5, diagnostics=True, remat="sqrt")
    (_, _, diag), grads = jax.jit(f)(params, carry, xs, targets)
    (_, _), grads_ref = jb.reference_value_and_grad(cell.step, mse, clip_norm=0.5)(params, carry, xs, targets)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12), grads, grads_ref)
    assert diag.adjoint_norm.dtype == jnp.float64 and bool(jnp.any(diag.clipped))
    assert bool(jnp.all(diag.adjoint_norm >= 0))


def test_lru_initialisation_follows_the_ring():
    params = jb.lru(2000, 0.4, 0.9).init(jax.random.key(2), 3, jnp.float64)
    radius = jnp.exp(-jnp.exp(params["nu_log"]))
    assert 0.4 <= float(radius.min()) < 0.42 and 0.88 < float(radius.max()) <= 0.9
    np.testing.assert_allclose(jnp.exp(params["gamma_log"]), jnp.sqrt(1 - radius**2), rtol=1e-12)
    assert float(jnp.exp(params["theta_log"]).max()) < 2 * np.pi


def test_float32_parallel_close_to_step():
    cell, params, carry, xs, _ = _problem("lru", jnp.float32)
    got, want = jax.jit(cell.parallel)(params, carry, xs), jax.jit(_sequential(cell))(params, carry, xs)
    assert got[0].dtype == jnp.complex64 and got[1].dtype == jnp.float32
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)


@pytest.mark.parametrize("make, match", [
    (lambda: jb.lru(4, 0.9, 0.5), "0 <= r_min < r_max <= 1"),
    (lambda: jb.lru(4, 0.0, 1.5), "0 <= r_min < r_max <= 1"),
    (lambda: jb.lru(4, max_phase=0.0), "max_phase must be > 0"),
    (lambda: jb.mingru(0), "hidden_size must be a positive int"),
    (lambda: jb.minlstm(2).init(jax.random.key(0), 0), "input_size must be a positive int"),
])
def test_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_adding_experiment_at_a_tiny_size():
    """`python -m examples.experiments --modern` at its smoke size, one cell and one seed."""
    from examples.parallel_experiments import run_modern

    (result,) = run_modern(quick=True, seeds=1, models=("minGRU",))
    assert (result.experiment, result.model, result.iterations) == ("adding, T=10", "minGRU (lr 0.01)", 20)
    assert result.curves.shape == (1, 20) and np.isfinite(result.curves).all()
    assert result.values.shape == (1,) and np.isfinite(result.values).all()


def test_parallel_split_over_time_on_one_device():
    """`parallel(..., axis_name=)` inside `jax.shard_map` on a one-device mesh (8 devices:
    tests/sharded_check.py): minLSTM in float64 with gradients, the LRU in float32; the final carry
    comes back replicated (out_specs P())."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("time",), axis_types=(jax.sharding.AxisType.Auto,))
    for name, dtype, rtol in (("minlstm", jnp.float64, 1e-12), ("lru", jnp.float32, 1e-5)):
        cell, params, carry, xs, targets = _problem(name, dtype)

        def split(params, carry, xs, cell=cell):
            return jax.shard_map(lambda p, c, x: cell.parallel(p, c, x, axis_name="time"), mesh=mesh,
                                 in_specs=(P(), P(), P("time")), out_specs=(P(), P("time")))(params, carry, xs)

        grads = lambda form: jax.jit(jax.value_and_grad(_loss(form), argnums=(0, 1, 2)))(params, carry, xs, targets)
        got, want = grads(split), grads(cell.parallel)
        assert got[0].dtype == want[0].dtype == dtype
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol), got, want)
    with pytest.raises(ValueError, match=r"parallel: axis_name 'time' is not a bound axis name here"):
        cell.parallel(params, carry, xs, axis_name="time")
