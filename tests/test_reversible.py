"""Reversible recurrences: `remat=Invert()`, `revgru` / `revlstm` (exact inversion in fixed point),
`coupled` and `invertible`. Gradients are checked against `jax.grad` through `lax.scan` of the same
step (whose quantisations pass gradients straight through)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxbptt as jb
from jaxbptt._cells import fixed_point as fx
from steps import mse, scan_loss

T, B, D, H = 13, 2, 3, 4


def _model(name, dtype=jnp.float64, max_forget_bits=3, max_steps=100, seed=0):
    model = jb.with_readout(getattr(jb, name)(H, max_forget_bits=max_forget_bits, max_steps=max_steps), 2)
    kp, kx, kt = jax.random.split(jax.random.key(seed), 3)
    params = model.init(kp, D, dtype)
    params["cell"]["b"] = params["cell"]["b"] + 0.3 * jax.random.normal(kp, params["cell"]["b"].shape, dtype)
    xs = jax.random.normal(kx, (T, B, D), dtype)
    return model, params, xs, jax.random.normal(kt, (T, B, 2), dtype)


def _carry_after(model, params, steps, dtype=jnp.float64):
    """A carry reached by running the model (a consistent fixed-point state, a used buffer)."""
    xs = jax.random.normal(jax.random.key(7), (steps, B, D), dtype)
    return lax.scan(lambda c, x: model.step(params, c, x), model.initial_carry((B,), dtype), xs)[0]


def _rebuild(step, params, final, xs):
    return lax.scan(lambda c, x: (step.inverse(params, c, x), None), final, xs, reverse=True)[0]


def _float_leaves(carry):
    return [a for a in jax.tree.leaves(carry) if jnp.issubdtype(a.dtype, jnp.floating)]


@pytest.mark.parametrize("name", ["revgru", "revlstm"])
def test_reversible_cells_match_autodiff(name):
    """`value_and_grad` and `jax.grad` of `unroll` (also with respect to the carry's float leaves; its
    integers get float0) under Invert(), against `jax.grad` through `lax.scan`; the forward bit for bit."""
    model, params, xs, targets = _model(name)
    carry = _carry_after(model, params, 9)
    loss = lambda y, t: jnp.sum(y**2)

    def grads(unroll):
        def f(p, c):
            final, ys = unroll(p, c)
            return jnp.sum(ys**2), final

        return jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True, allow_int=True))(params, carry)

    (oracle, ref_final) = grads(lambda p, c: lax.scan(lambda c_, x: model.step(p, c_, x), c, xs))
    got, final = grads(lambda p, c: jb.unroll(model.step, p, c, xs, remat=jb.Invert(block=5)))
    chex.assert_trees_all_equal(final, ref_final)
    chex.assert_trees_all_close(got[0], oracle[0], rtol=1e-12, atol=1e-15)
    chex.assert_trees_all_close(_float_leaves(got[1]), _float_leaves(oracle[1]), rtol=1e-12, atol=1e-15)
    (_, final), dparams = jb.value_and_grad(model.step, loss, remat=jb.Invert(block=4))(params, carry, xs, targets)
    chex.assert_trees_all_close(dparams, oracle[0], rtol=1e-12, atol=1e-15)
    chex.assert_trees_all_equal(final, ref_final)


def test_invert_equals_stored_with_options():
    """Invert() against storing every step (and the surrogate oracle), with Williams-Peng truncation,
    clipping and diagnostics."""
    model, params, xs, targets = _model("revgru")
    carry = model.initial_carry((B,), jnp.float64)
    options = dict(truncation=(3, 7), clip_norm=0.3)
    run = lambda remat: jax.jit(jb.value_and_grad(model.step, mse, remat=remat, diagnostics=True, **options))(
        params, carry, xs, targets)
    got, stored = run(jb.Invert(block=3)), run(None)
    chex.assert_trees_all_close(got, stored, rtol=1e-12, atol=1e-15)  # loss, final carry, diagnostics, grads
    assert bool(got[0][2].clipped.any())
    oracle = jb.reference_value_and_grad(model.step, mse, **options)(params, carry, xs, targets)[1]
    chex.assert_trees_all_close(got[1], oracle, rtol=1e-10, atol=1e-13)


def test_invert_float32_equals_stored_and_vmap():
    model, params, xs, targets = _model("revlstm", jnp.float32)
    carry = model.initial_carry((B,), jnp.float32)
    loss = lambda y, t: jnp.sum((y - t) ** 2)  # summed over rows: the batch's gradient is the rows' sum
    f = lambda remat: jb.value_and_grad(model.step, loss, remat=remat)
    got, stored = f(jb.Invert(block=4))(params, carry, xs, targets)[1], f(None)(params, carry, xs, targets)[1]
    for g, s in zip(jax.tree.leaves(got), jax.tree.leaves(stored)):
        assert np.linalg.norm(g - s) <= 1e-6 * np.linalg.norm(s)
    # jax.vmap over sequences, one row each
    unbatched = model.initial_carry((), jnp.float32)
    rows = jax.vmap(lambda x, t: f(jb.Invert(block=4))(params, unbatched, x, t)[1], in_axes=(1, 1))(xs, targets)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a.sum(0), rows), got, rtol=1e-5, atol=1e-5)


def test_inversion_bit_for_bit_over_1e5_steps():
    """10^5 steps with int32 buffer words (no x64; they fill every 7-8 steps), and with int64 ones:
    the cells come back bit for bit."""
    for x64, name, length in ((False, "revgru", 100_000), (True, "revlstm", 10_000)):
        with jax.enable_x64(x64):
            dtype = jnp.float64 if x64 else jnp.float32
            cell = getattr(jb, name)(4, max_steps=length)
            params = cell.init(jax.random.key(0), 2, dtype)
            carry = cell.initial_carry((2,), dtype)
            xs = jax.random.normal(jax.random.key(1), (length, 2, 2), dtype)

            @jax.jit
            def round_trip(carry, xs):
                final = lax.scan(lambda c, x: cell.step(params, c, x), carry, xs)[0]
                return final, _rebuild(cell.step, params, final, xs)

            final, back = round_trip(carry, xs)
            assert int(final.buffer.depth.min()) > length // (60 if x64 else 25)  # the stack was used
            chex.assert_trees_all_equal(back, carry)


def test_buffer_holds_max_steps_at_the_forgetting_bound():
    """Every gate at its bound (2**-b): the stack fills at the fastest rate the bound allows, and
    holds exactly `max_steps` steps."""
    bits, steps = 5, 300
    cell = jb.revgru(4, max_forget_bits=bits, max_steps=steps)
    params = cell.init(jax.random.key(0), 2)
    params["b"] = params["b"].at[:2].set(-50.0).at[6:8].set(-50.0)  # z1, z2 -> 0: z = 2**-bits
    xs = jax.random.normal(jax.random.key(1), (3, steps, 1, 2))
    carry = cell.initial_carry((1,))
    run = jax.jit(lambda c, xs: lax.scan(lambda c_, x: cell.step(params, c_, x), c, xs)[0])
    final = run(carry, xs[0])
    assert not bool(final.buffer.lost().any()) and int(final.buffer.depth[0, 0]) >= 0.9 * fx.capacity(steps, bits)
    chex.assert_trees_all_equal(jax.jit(functools.partial(_rebuild, cell.step, params))(final, xs[0]), carry)
    overflowed = run(run(final, xs[1]), xs[2])
    assert bool(overflowed.buffer.lost().all())
    # the values never depend on the stack's capacity: a one-word buffer computes the same states
    small = jb.revgru(4, max_forget_bits=bits, max_steps=1)
    unsized = lax.scan(lambda c, x: small.step(params, c, x), small.initial_carry((1,)), xs.reshape(-1, 1, 2))[0]
    chex.assert_trees_all_equal((unsized.h, unsized.h_fixed), (overflowed.h, overflowed.h_fixed))


def test_unbatched_step_under_vmap_equals_the_batched_step():
    model, params, _, _ = _model("revgru")
    carry = _carry_after(model, params, 80)  # with pushed words
    x = jax.random.normal(jax.random.key(3), (B, D))
    batched = model.step(params, carry, x)
    mapped = jax.vmap(model.step, in_axes=(None, 0, 0))(params, carry, x)
    chex.assert_trees_all_equal(mapped, batched)
    chex.assert_trees_all_equal(jax.vmap(model.step.inverse, in_axes=(None, 0, 0))(params, batched[0], x), carry)


def _coupled_problem(dtype=jnp.float64):
    mlp = lambda w, h, x: {"a": jnp.tanh(h @ w[0] + x @ w[1])}
    step = jb.coupled(lambda w, h, x: mlp(w, h["b"], x), lambda w, h, x: {"b": jnp.tanh(h["a"] @ w[0] + x @ w[1])})
    k = jax.random.split(jax.random.key(0), 5)
    w = lambda k1, k2: (jax.random.normal(k1, (H, H), dtype) / 2, jax.random.normal(k2, (D, H), dtype))
    params = (w(k[0], k[1]), w(k[2], k[3]))
    carry = ({"a": jnp.zeros((B, H), dtype)}, {"b": jnp.ones((B, H), dtype)})
    return step, params, carry, jax.random.normal(k[4], (T, B, D), dtype)


def test_coupled_gradients_and_readout():
    step, params, carry, xs = _coupled_problem()
    loss = lambda y, t: jnp.sum((y[0]["a"] - t) ** 2) + jnp.sum(y[1]["b"] ** 2)
    targets = jnp.ones((T, B, H))
    oracle = jax.grad(lambda p: scan_loss(step, loss)(p, carry, xs, targets)[0])(params)
    for remat in (None, jb.Invert(block=4)):
        got = jb.value_and_grad(step, loss, remat=remat)(params, carry, xs, targets)[1]
        chex.assert_trees_all_close(got, oracle, rtol=1e-10, atol=1e-13)
    unrolled = jax.jit(lambda p: jnp.sum(jb.unroll(step, p, carry, xs, remat=jb.Invert(block=4))[1][1]["b"] ** 2))
    jax.test_util.check_grads(unrolled, (params,), order=1, modes=["rev"])
    # a readout keeps the inverse, for the generic kernel's path too
    cell = jb.with_readout(jb.Cell(lambda *a: params, lambda *a: carry, jb.invertible(
        lambda p, c, x: (step(p, c, x)[0], step(p, c, x)[0][1]["b"]), step.inverse)), 2)
    p_out = {"cell": params, "W_hy": jnp.ones((H, 2)), "b_y": jnp.zeros(2)}
    assert isinstance(cell.step, jb.Step)
    chex.assert_trees_all_close(cell.step.inverse(p_out, cell.step(p_out, carry, xs[0])[0], xs[0]), carry, rtol=1e-12)
    vg = lambda remat: jb.value_and_grad(cell.step, mse, remat=remat)(p_out, carry, xs, jnp.zeros((T, B, 2)))[1]
    chex.assert_trees_all_close(vg(jb.Invert(block=5)), vg(None), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype, bound", [(jnp.float64, 1e-12), (jnp.float32, 1e-4)])
def test_coupled_reconstruction_error(dtype, bound):
    """Inverted over every step, the rebuilt initial carry is off by rounding only."""
    step, params, carry, xs = _coupled_problem(dtype)
    final = lax.scan(lambda c, x: step(params, c, x), carry, xs)[0]
    error = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(_rebuild(step, params, final, xs)),
                                                                jax.tree.leaves(carry)))
    assert error <= bound


def test_invertible_keeps_a_step_kernel():
    cell = jb.gru(H)
    step = jb.invertible(cell.step, lambda p, c, x: c)
    assert isinstance(step, jb.Step) and step.make_kernel is cell.step.make_kernel and step.inverse(0, 1, 2) == 1


def _wrong_inverse():
    step = jb.invertible(lambda p, c, x: (c + x, c), lambda p, c, x: (c, c))
    return jb.value_and_grad(step, mse, remat=jb.Invert())(0.0, jnp.zeros(2), jnp.ones((3, 2)), jnp.ones((3, 2)))


@pytest.mark.parametrize("make, error, match", [
    (lambda: jb.value_and_grad(jb.elman(2).step, mse, remat=jb.Invert())(
        jb.elman(2).init(jax.random.key(0), 1), jnp.zeros(2), jnp.ones((3, 1)), jnp.ones((3, 2))),
     ValueError, r"remat=jaxbptt.Invert\(\) rebuilds each carry .* this step declares none"),
    (lambda: jax.grad(lambda p: jnp.sum(jb.unroll(jb.elman(2).step, p, jnp.zeros(2), jnp.ones((3, 1)),
                                                 remat=jb.Invert())[1]))(jb.elman(2).init(jax.random.key(0), 1)),
     ValueError, r"declares none"),
    (_wrong_inverse, TypeError, r"the step's inverse must return a carry like the step's"),
    (lambda: jb.value_and_grad(jb.elman(2).step, mse, remat=jb.Invert(block=0)), ValueError,
     r"remat=Invert\(block\) needs block None or an int >= 1 .*got block=0"),
    (lambda: jb.value_and_grad(jb.elman(2).step, mse, remat=jb.Invert(), engine="autodiff"), ValueError,
     r"engine=Autodiff\(checkpoint=False\) does not honour remat=Invert\(block=None\)"),
    (lambda: jb.invertible(lambda p, c, x: (c, c), 3), TypeError, r"inverse must be callable"),
    (lambda: jb.coupled(lambda p, h, x: h, None), TypeError, r"g must be callable"),
    (lambda: jb.coupled(lambda p, h, x: h[:1], lambda p, h, x: h)((0, 0), (jnp.ones(2), jnp.ones(2)), 0),
     TypeError, r"f\(pf, h2, x\) must return a pytree like h1"),
    (lambda: jb.coupled(lambda p, h, x: h, lambda p, h, x: h)((0, 0), jnp.ones(2), 0), TypeError,
     r"coupled\(f, g\) needs carry as a pair \(h1, h2\); got ArrayImpl"),
    (lambda: jb.revgru(5), ValueError, r"hidden_size must be even .*got 5"),
    (lambda: jb.revlstm(4, max_forget_bits=11), ValueError, r"max_forget_bits must be an int in \[1, 10\].*got 11"),
    (lambda: jb.revgru(4, max_steps=0), ValueError, r"max_steps must be a positive int; got 0"),
    (lambda: jb.revgru(4).step(jb.revgru(4).init(jax.random.key(0), 2), jnp.zeros(4), jnp.ones(2)), TypeError,
     r"carry of the revgru cell must be a RevGRUState .*got ArrayImpl"),
    (lambda: jb.revlstm(4).step.inverse(jb.revlstm(4).init(jax.random.key(0), 2), jb.revlstm(4).initial_carry(),
                                        jnp.ones(3)), ValueError, r"x must have input_size=2 features"),
])
def test_errors_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_char_lm_measures_invert_memory():
    from examples import char_lm

    args = char_lm.parse(["--cell", "revlstm", "--hidden", "8", "--embed", "4", "--batch", "2", "--memory-length", "64"])
    memory = char_lm.gradient_memory(args, 30)
    assert memory["Invert()"] < memory["None"]
