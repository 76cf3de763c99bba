"""JAX's own tests of `lax.scan`, ported to `jaxbptt.unroll`.

Ported from JAX's tests/lax_control_flow_test.py (https://github.com/jax-ml/jax, Apache License
2.0, Copyright 2018 The JAX Authors), and `test_custom_vjp_scan_batching_edge_case` from its
tests/custom_api_test.py: every scan test whose body fits the step protocol, each named after the
JAX test it ports. `lax.scan(f, init, xs)` becomes `jb.unroll(lambda p, c, x: f(c, x), None,
init, xs)` (`unroll_as_scan`), or takes as `params` the arrays `f` closes over that are
differentiated. Each case checks jaxbptt's values and reverse-mode derivatives (`jax.grad`,
`jax.vjp`) against `lax.scan`'s in float64, where JAX checks scan against a Python loop.

How the port departs from JAX's tests:
1. Forward mode is left out (testScanJVP, testScanLinearize, the `modes=["fwd"]` checks,
   testIssue757's `jacfwd`, run here with `jacrev`): `unroll`'s derivative is a custom VJP.
2. Tests of lax.scan's own machinery are left out, since they inspect what `unroll` does not
   share: jaxprs and HLO (test_scan_typecheck_param, test_scan_unroll's HLO sizes,
   test_scan_lowering_doesnt_introduce_singleton, test_scan_input_to_output_forwarding,
   testIssue810's dynamic-update-slice count), and the identity of stored residuals
   (test_scan_vjp_forwards_extensive_residuals keeps only its values and VJP).
3. `pmap` (testIssue804) becomes `vmap` with an axis name, on one device.
4. `length=` with `xs=None` has no `unroll` equivalent yet: test_length_argument is an expected
   failure, and the tests that use it for a body without inputs run here on a dummy `xs`.
5. So that the port stays fast, the variants of one test run in a single compiled program, and
   two grids are thinned: testScanImpl's `jit_scan=False` runs the plain implementation only
   (an eager run compiles every operation on its own), and testScanVmap's batch axes are all
   tried without a wrapper, but with `jit` or `jax.checkpoint` between `vmap` and `unroll` once
   per pattern of what is batched (the carry, the inputs, both).
6. Under `vmap`, `unroll` is a custom VJP whose outputs JAX cannot see through: a carry passed
   through unchanged comes out batched where `lax.scan`'s stays unbatched
   (test_scan_readonly_carry_optimization runs with `out_axes=0`).
"""

import itertools
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import checkpoint_policies, lax

import jaxbptt as jb


def unroll_as_scan(f, **options):
    """`lax.scan(f, init, xs)` spelled with `jaxbptt.unroll`: a step without parameters."""
    return lambda init, xs: jb.unroll(lambda params, carry, x: f(carry, x), None, init, xs, **options)


def lax_scan(f, **options):
    return lambda init, xs: lax.scan(f, init, xs, **options)


def objective(tree):
    """A scalar of every float leaf, nonlinear so that each leaf gets its own cotangent."""
    return sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(a), jnp.inexact))


def outputs_and_grads(fn, argnums=0):
    """`args -> (fn(*args), grad of objective(fn(*args)) with respect to args[argnums])`."""

    def run(*args):
        grads, out = jax.grad(lambda *a: (objective(out := fn(*a)), out), argnums, has_aux=True)(*args)
        return out, grads

    return run


def assert_close(ours, reference, rtol=1e-10):
    chex.assert_trees_all_equal_structs(ours, reference)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=1e-13)


D = np.random.RandomState(0).randn(2)


def f_impl(c, a):
    """testScanImpl's (and testScanVmap's) body: carry (4,), input (3,), scalar output."""
    b = jnp.cos(jnp.sum(jnp.sin(a)) + jnp.sum(jnp.cos(c)) + jnp.sum(D))
    return jnp.sin(c * b), b


def f_grad(c, a):
    """testScanGrad's body."""
    b = jnp.sum(jnp.sin(a)) + jnp.sum(jnp.sin(c)) + jnp.sum(jnp.sin(D))
    return jnp.sin(c * b), b


def checkpointed(policy):
    return lambda scan: (lambda f, **options: jax.checkpoint(scan(f, **options), policy=policy))


# JAX's SCAN_IMPLS_WITH_FOR: a way of building `scan(f)` from `lax_scan` or `unroll_as_scan`.
IMPLS = {
    "unroll1": lambda scan: scan,
    "unroll2": lambda scan: partial(scan, unroll=2),
    "new_checkpoint": checkpointed(checkpoint_policies.nothing_saveable),
    "new_checkpoint2": checkpointed(checkpoint_policies.everything_saveable),
}


@pytest.mark.parametrize("jit_scan", [False, True])
def test_scan_impl_and_grad(jit_scan):
    """testScanImpl and testScanGrad: values, and gradients with respect to the carry and the
    inputs, for each of JAX's scan implementations, and with the body jitted (jit_f); the unroll
    jitted (jit_scan: all in one program) or run eagerly (the plain implementation only, since an
    eager run compiles every operation on its own)."""
    rng = np.random.RandomState(1)
    as_, c = rng.randn(5, 3), rng.randn(4)
    variants = [("unroll1", jax.jit(f_grad))] + [(impl, f_grad) for impl in IMPLS] if jit_scan else [
        ("unroll1", f_grad)]

    def both(scan):
        return [outputs_and_grads(IMPLS[impl](scan)(body), argnums=(0, 1))(c, as_) for impl, body in variants]

    run = jax.jit(both, static_argnums=0) if jit_scan else both
    assert_close(run(unroll_as_scan), run(lax_scan))




@pytest.mark.parametrize("unroll", [True, 0])
def test_scan_unroll(unroll):
    """test_scan_unroll's spellings of a fully unrolled loop (its HLO sizes are lax.scan's own)."""
    xs, c = jnp.ones((5, 3)), jnp.ones(4)
    run = jax.jit(lambda scan: outputs_and_grads(scan(f_impl, unroll=unroll), argnums=(0, 1))(c, xs), static_argnums=0)
    assert_close(run(unroll_as_scan), run(lax_scan))


def test_scan_invalid_unroll_raises():
    """testScanInvalidUnrollRaises and test_scan_unroll_concrete_error: a clear error at trace time."""
    with pytest.raises(ValueError, match="unroll must be a positive int .* got unroll=-1"):
        unroll_as_scan(f_impl, unroll=-1)(jnp.ones(4), jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="unroll must be a positive int .* got unroll=JitTracer"):
        jax.jit(lambda n, x: jb.unroll(lambda p, c, z: (c, z), None, x, jnp.ones(3), unroll=n))(3, 1.0)


def test_scan_higher_order_differentiation():
    """testScanHigherOrderDifferentiation: second derivatives (reverse mode twice, as a
    Hessian-vector product) against lax.scan's, exact where JAX's finite differences are not."""
    d = 0.75

    def f(c, a):
        b = jnp.sin(c * jnp.sum(jnp.cos(d * a)))
        c = 0.9 * jnp.cos(d * jnp.sum(jnp.sin(c * a)))
        return c, b

    as_, c = jnp.arange(6.0).reshape((3, 2)), jnp.array(1.0)

    @partial(jax.jit, static_argnums=0)
    def second(scan):  # the gradient and a Hessian-vector product
        grad = jax.grad(lambda c, a: objective(scan(f)(c, a)), (0, 1))
        slope = lambda c, a: sum(jnp.vdot(g, jnp.cos(v)) for g, v in zip(grad(c, a), (c, a)))
        return grad(c, as_), jax.grad(slope, (0, 1))(c, as_)

    assert_close(second(unroll_as_scan), second(lax_scan))


def vmap_reference(fn, cases, in_axes, argnums, per_example=False):
    """What `outputs_and_grads(jax.vmap(fn, axes), argnums)(*args)` must return for each `(axes,
    args)` of `cases`, computed once for them all by `lax.scan`: each argument is moved to batch
    axis 0 (broadcast when unbatched), and one vmap over cases and examples gives every example's
    outputs and gradients; an unbatched argument's gradient is the sum over the examples. With
    `per_example`, what `jax.vmap(outputs_and_grads(fn, argnums), axes)` returns instead: every
    gradient per example, along axis 0."""
    size = next(np.shape(leaf)[ax] for args, axes in zip(cases, in_axes) for a, ax in zip(args, axes)
                if ax is not None for leaf in jax.tree.leaves(a))
    move = lambda a, ax: jax.tree.map(lambda l: np.moveaxis(l, ax, 0) if ax is not None
                                      else np.broadcast_to(l, (size,) + np.shape(l)), a)
    canonical = [[move(a, ax) for a, ax in zip(args, axes)] for args, axes in zip(cases, in_axes)]
    stacked = [jax.tree.map(lambda *leaves: np.stack(leaves), *arg) for arg in zip(*canonical)]
    outs, grads = jax.jit(jax.vmap(jax.vmap(outputs_and_grads(fn, argnums))))(*stacked)
    results = []
    for i, axes in enumerate(in_axes):
        if per_example:
            results.append(jax.tree.map(lambda a: a[i], (outs, grads)))
            continue
        case_grads = tuple(jax.tree.map(lambda l: l[i].sum(0) if axes[j] is None else jnp.moveaxis(l[i], 0, axes[j]), g)
                           for j, g in zip(argnums, grads))
        results.append((jax.tree.map(lambda a: a[i], outs), case_grads))
    return results


VMAP_AXES = [axes for axes in itertools.product([None, 0, 1], [None, 0, 1, 2]) if axes != (None, None)]


@pytest.mark.parametrize("between", ["nothing", "jit",
                                     "checkpoint"])
def test_scan_vmap(between):
    """testScanVmap: every pair of batch axes of the carry and the inputs (7 examples), with
    `between` the unroll and `vmap`; values and the VJP of the vmapped unroll."""
    wrap = {"nothing": lambda f: f, "jit": jax.jit, "checkpoint": jax.checkpoint}[between]
    # With a wrapper, one case per pattern of what is batched (the carry, the inputs, both): a
    # custom VJP sees its batched arguments moved to axis 0, so the axis itself changes nothing.
    all_axes = VMAP_AXES if between == "nothing" else [(1, None), (None, 2), (0, 1)]
    rng, cases = np.random.RandomState(2), []
    for c_axis, as_axis in all_axes:
        c_shape, as_shape = [4], [5, 3]
        if c_axis is not None:
            c_shape.insert(c_axis, 7)
        if as_axis is not None:
            as_shape.insert(as_axis, 7)
        cases.append((rng.randn(*c_shape), rng.randn(*as_shape)))

    @jax.jit
    def run(cases):
        return [outputs_and_grads(jax.vmap(wrap(unroll_as_scan(f_impl)), axes), argnums=(0, 1))(*args)
                for axes, args in zip(all_axes, cases)]

    assert_close(run(cases), vmap_reference(lax_scan(f_impl), cases, all_axes, argnums=(0, 1)))


def test_scan_vmap_tuples_and_fixpoint():
    """testScanVmapTuples (tuple carry and inputs batched along different axes) and
    testScanVmapFixpoint (a carry shifted left each step, only its last entry batched)."""

    def f(c, a):
        a1, a2 = a
        c1, c2 = c
        b = jnp.sum(jnp.cos(a1)) * jnp.sum(c2 * a2)
        return (c1 * jnp.sin(jnp.sum(a1 * a2)), c2 * jnp.cos(jnp.sum(a1))), b

    rng = np.random.RandomState(3)
    as_ = (rng.randn(3, 7), rng.randn(3, 4, 7))
    c = (rng.randn(7, 2), rng.randn(7))

    def shift(c, x):
        return (c[1], c[2], c[3], 0.0), None

    @partial(jax.jit, static_argnums=0)
    def run(scan, c, as_, carry_init):
        tuples = outputs_and_grads(jax.vmap(scan(f), (0, (1, 2))), argnums=(0, 1))(c, as_)
        fixpoint = outputs_and_grads(jax.vmap(lambda ci: scan(shift)((0.0, 1.0, 2.0, ci), jnp.zeros(2))))(carry_init)
        return tuples, fixpoint

    carry_init = jnp.array([3.0, 4.0, 5.0])
    ours = run(unroll_as_scan, c, as_, carry_init)
    assert_close(ours, run(lax_scan, c, as_, carry_init))
    (carry_out, _), _ = ours[1]
    np.testing.assert_array_equal(carry_out[1], carry_init)  # after two shifts


N_IN, N_HID, N_OUT = 4, 2, 1


def rnn_step(params, state, x):
    """testScanRnn's step: the transition and readout read the state and the input stacked."""
    W_trans, W_out = params
    stacked = jnp.concatenate([state, x])
    return jnp.tanh(jnp.dot(W_trans, stacked)), jnp.tanh(jnp.dot(W_out, stacked))


def rnn_loss(unroll):
    def loss(params, state, inputs, targets):
        _, predictions = unroll(rnn_step, params, state, inputs)
        return jnp.sum((predictions - targets) ** 2)

    return loss


def scan_unroll(step, params, carry, xs):
    return lax.scan(lambda c, x: step(params, c, x), carry, xs)


def rnn_data(length, seed=0):
    r = np.random.RandomState(seed)
    params = (r.randn(N_HID, N_HID + N_IN), r.randn(N_OUT, N_HID + N_IN))
    return params, 0.1 * r.randn(N_HID), r.randn(length, N_IN), r.randn(length, N_OUT)


def test_scan_rnn():
    """testScanRnn: a jitted loss of an RNN; its value and gradients (parameters, initial state,
    inputs, targets) against lax.scan's (second derivatives: test_scan_higher_order_differentiation)."""
    args = rnn_data(length=3)
    run = jax.jit(lambda unroll, args: outputs_and_grads(jax.jit(rnn_loss(unroll)), (0, 1, 2, 3))(*args),
                  static_argnums=0)
    assert_close(run(jb.unroll, args), run(scan_unroll, args))


# Which of (params, initial state, inputs) are batched over the 3 examples: every combination.
RNN_BATCHED = [b for b in itertools.product([False, True], repeat=3) if any(b)]


@pytest.mark.parametrize("order", ["vmap_of_jit", "jit_of_vmap"])
def test_scan_rnn_batched(order):
    """testScanRnn's batch of losses, as training takes it: `vmap` over 3 examples of a loss, with
    every combination of batched and unbatched parameters, initial state and inputs (the targets
    are always batched); `jax.grad` of the batch's summed loss with `jit` inside `vmap`, and
    per-example gradients (`vmap` of `jax.grad`) with `jit` outside."""
    params, state, _, _ = rnn_data(length=7)
    r = np.random.RandomState(1)
    cases, in_axes = [], []
    for batched in RNN_BATCHED:
        spread = lambda a, b: np.stack([a * (1 + 0.1 * i) for i in range(3)]) if b else a
        cases.append((jax.tree.map(lambda a: spread(a, batched[0]), params), spread(state, batched[1]),
                      spread(r.randn(7, N_IN), batched[2]), r.randn(3, 7, N_OUT)))
        in_axes.append(tuple(0 if b else None for b in batched) + (0,))
    loss = rnn_loss(jb.unroll)

    @jax.jit
    def run(cases):
        if order == "vmap_of_jit":  # jax.grad of the summed losses: the gradient of a batch
            batch = lambda axes: outputs_and_grads(jax.vmap(jax.jit(loss), axes), (0, 1, 2))
        else:  # vmap of jax.grad: per-example gradients
            batch = lambda axes: jax.jit(jax.vmap(outputs_and_grads(loss, (0, 1, 2)), axes))
        return [batch(axes)(*args) for axes, args in zip(in_axes, cases)]

    expected = vmap_reference(rnn_loss(scan_unroll), cases, in_axes, (0, 1, 2), per_example=order == "jit_of_vmap")
    assert_close(run(cases), expected)




@pytest.mark.parametrize("width", [1, 0])
def test_issue711(width):
    """testIssue711: reverse mode through an unroll whose step itself takes a gradient, with an int
    counter in the carry and, as JAX has it, inputs of width 0 (`jnp.zeros((T, 0))`) as the only xs."""

    def minimize_structure(test_params, scan):
        energy_fn = lambda conf: jnp.sum(conf * test_params)

        def apply_carry(carry, x):
            i, x_ = carry
            return (i + 1, x_ - 0.1 * jax.grad(energy_fn)(x_)), x

        (_, x_final), _ = scan(apply_carry)((0, jnp.array([1.0, 2.0, 3.0])), jnp.zeros((7, width)))
        return jnp.sum(jnp.sin(1.0 - x_final))

    run = jax.jit(lambda scan, p: outputs_and_grads(lambda p: minimize_structure(p, scan))(p), static_argnums=0)
    assert_close(run(unroll_as_scan, 0.25), run(lax_scan, 0.25))




@pytest.mark.parametrize("differentiate", [False, True])
def test_scan_vmap_collectives(differentiate):
    """test_scan_vmap_collectives and testIssue804 (`pmap` there, `vmap` here): `lax.psum` over the
    vmapped axis inside the step, in the carry and in the output; values, and the VJP."""

    def f(c, x):
        return c + lax.psum(x, "i"), lax.psum(c, "i") * x

    state, xs = jnp.array([1.0, 2.0]), jnp.arange(10.0).reshape((2, 5))
    batch = lambda scan: jax.vmap(scan(f), axis_name="i")
    run = jax.jit(lambda scan: outputs_and_grads(batch(scan), (0, 1))(state, xs) if differentiate
                  else batch(scan)(state, xs), static_argnums=0)
    assert_close(run(unroll_as_scan), run(lax_scan))




@pytest.mark.parametrize("coeff_cotangent", ["array", "python_float"])
def test_custom_vjp_scan_batching_edge_case(coeff_cotangent):
    """custom_api_test's test_custom_vjp_scan_batching_edge_case: a custom_vjp in the step, closing
    over a coefficient, vmapped over examples; its bwd returns an array, or a Python float as
    test_float0_cotangents_automatically_handled's does (a constant surrogate gradient)."""

    @jax.custom_vjp
    def mul(x, coeff):
        return x * coeff

    def mul_bwd(res, g):
        x, coeff = res
        return g * coeff, (x * g).sum() if coeff_cotangent == "array" else 0.5

    mul.defvjp(lambda x, coeff: (mul(x, coeff), (x, coeff)), mul_bwd)

    def scan_over_mul(scan, x, coeff):
        return scan(lambda x, t: (mul(x, coeff), None))(x, jnp.arange(3))[0]

    x_batch = jax.random.normal(jax.random.key(0), (3, 2))
    run = jax.jit(lambda scan, x, c: outputs_and_grads(jax.vmap(partial(scan_over_mul, scan), (0, None)), (0, 1))(x, c),
                  static_argnums=0)
    assert_close(run(unroll_as_scan, x_batch, 1.3), run(lax_scan, x_batch, 1.3))


def test_length_argument():
    """testScanLengthArg, test_scan_xs_none, testScanLengthError, and test_scan_hoisting_consts'
    gradient of a body without inputs."""
    arange = lambda n: jb.unroll(lambda p, c, _: (c + 1, c), None, 0, None, length=n)[1]
    np.testing.assert_array_equal(arange(10), np.arange(10))
    h, _ = jb.unroll(lambda p, h, _: (h + 1, None), None, 0, None, length=20)
    assert h == 20
    with pytest.raises(ValueError, match="length"):
        jb.unroll(lambda p, c, x: (c, x), None, 0, jnp.arange(10), length=5)
    A = jnp.arange(4.0).reshape(2, 2)

    def f(x, unroll):
        final, _ = unroll(lambda p, c, _: (jnp.dot(A, c), None), None, x * jnp.ones(2), None, length=3)
        return jnp.sum(final)

    scan = lambda step, p, c, xs, length: lax.scan(lambda c, x: step(p, c, x), c, xs, length=length)
    assert_close(jax.grad(f)(1.0, jb.unroll), jax.grad(f)(1.0, scan))


def test_scan_reverse():
    """test_scan_reverse: a cumulative sum of ints, forwards and reversed, with and without jit
    (test_unroll.py checks the gradients of reversed unrolls)."""
    x = np.array([3, 1, 4, 1, 5, 9])
    cumsum = lambda x, reverse: jb.unroll(lambda p, c, x: (c + x, c + x), None, 0, x, reverse=reverse)[1]
    for disable in (False, True):
        with jax.disable_jit(disable):
            np.testing.assert_array_equal(cumsum(x, False), np.cumsum(x))
            np.testing.assert_array_equal(cumsum(x, True), np.cumsum(x[::-1])[::-1])


def test_scan_init_weak_type():
    """test_scan_init_weak_type: a Python int initial carry takes the inputs' integer dtype."""
    dtypes = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
    run = jax.jit(lambda scan: [scan(lambda c, x: (c + x, x))(0, jnp.ones(5, dtype)) for dtype in dtypes],
                  static_argnums=0)
    for dtype, (carry, result), (expected, _) in zip(dtypes, run(unroll_as_scan), run(lax_scan)):
        assert carry.dtype == expected.dtype == dtype and carry == 5, dtype
        np.testing.assert_array_equal(result, np.ones(5, dtype))


def test_scan_body_errors():
    """testScanBodyOutputError, testScanBodyCarryPytreeMismatchErrors,
    testScanBodyCarryTypeMismatchErrors and testIssue744: jaxbptt's own message, naming what the
    step returned and what it should have."""
    with pytest.raises(TypeError, match=r"step must return a pair \(carry, y\)"):
        unroll_as_scan(lambda c, x: np.float32(0.0))(0.0, jnp.arange(5.0))
    with pytest.raises(TypeError, match=r"same pytree structure .* has structure PyTreeDef\(\(\*, \(\*, \*\)\)\) "
                                        r"but step returned PyTreeDef\(\(\*, \*, \*\)\)"):
        unroll_as_scan(lambda c, x: ((0, 0, 0), x))((1, (2, 3)), jnp.arange(5.0))
    with pytest.raises(TypeError, match=r"structure PyTreeDef\(\{'a': \*\}\) but step returned "
                                        r"PyTreeDef\(\{'a': \*, 'b': \*\}"):
        unroll_as_scan(lambda x, _: ({"a": x["a"], "b": x["a"]}, None))({"a": jnp.array(0, "int32")}, jnp.zeros(1))
    with pytest.raises(TypeError, match=r"carry\[1\] has type int32\[\] but the corresponding output carry "
                                        r"component has type float32\[\]"):
        pair = (jnp.array(0, "int32"),) * 2
        unroll_as_scan(lambda x, _: ((x[0], x[1].astype("float32")), None))(pair, jnp.zeros(1))
    with pytest.raises(ValueError, match=r"xs must have time as the leading axis of every leaf, but xs\[0\] is a "
                                         r"scalar"):
        unroll_as_scan(lambda p, i: (p, i))(jnp.array(1), list(range(5)))


def test_while_grad_error():
    """testWhileGradError (fori_inside_scan): JAX's own error for reverse mode through a
    `fori_loop` with float bounds, raised through the unroll as through lax.scan."""
    func = lambda x: unroll_as_scan(lambda c, x: (lax.fori_loop(x, x + 2.0, lambda i, c1: c1 * c, x), None))(
        x, np.ones(2))[0]
    with pytest.raises(ValueError, match="Reverse-mode differentiation does not work for lax.while_loop"):
        jax.grad(func)(1.0)


def test_issue_regressions():
    """Bodies from JAX's regression tests, values and gradients in one compiled program:
    testIssue1316 (a PRNG key in the carry), testIssue1361 (a carry entry reset to a constant),
    testIssue810 (a closed-over matrix, int inputs), testIssue757 (a gradient inside the body; jacrev
    for JAX's jacfwd), test_scan_hoisting_consts (closed-over constants), test_scan_fixpoint_instantiate
    (a carry replaced by constants), testForiLoopIssue8152 (a length-0 unroll), and
    test_scan_vjp_forwards_extensive_residuals (a cumulative product, with jax.checkpoint too).
    Bodies without inputs (`length=` in JAX) run on a dummy `xs`."""
    A = jnp.arange(4.0).reshape(2, 2) / 4
    B = jnp.arange(4.0).reshape(2, 2) / 4 + 0.25
    key = jax.random.PRNGKey(0)

    def issue1316(scan, c):
        def f(carry, _):
            c, key = carry
            key, _ = jax.random.split(key)
            return (c * 1.5, key), ()
        return scan(f)((c, key), np.ones(3))[0][0]

    def issue1361(scan, x):
        (x, _), _ = scan(lambda carry, _: ((2 * carry[0], 0.0), None))((x, 0.0), jnp.arange(3))
        return x

    def issue810(scan, x):
        last, _ = scan(lambda h, i: (jnp.matmul(A, h) + x, None))(jnp.zeros(2), jnp.arange(10))
        return jnp.sum(last)

    def issue757(scan, x):
        return jax.jacrev(lambda v: scan(lambda h, i: (jax.grad(jnp.cos)(h), i))(v, jnp.arange(10))[0])(x)

    def hoisting_consts(scan, x):
        def body(c, _):
            c1, c2, c3 = c
            return (jnp.dot(A, c1), jnp.dot(B, c2), jnp.dot(jnp.sin(B), c3)), None
        (c1, c2, c3), _ = scan(body)((x * jnp.ones(2), x * jnp.ones(2), x * jnp.ones(2)), jnp.zeros(3))
        return jnp.sum(c1) + jnp.sum(c2) + jnp.sum(c3)

    def fixpoint_instantiate(scan, x):
        c, () = scan(lambda c, _: ((0.0, 0.0), ()))((x, 0.0), jnp.zeros(5))
        return sum(c)

    def issue8152(scan, x):
        return scan(lambda c, x: (c + x, x))(x, jnp.zeros((0,)))[0]

    def cumprod(scan, x):
        s = jnp.ones((2, 4))
        plain = scan(lambda s, x: (x * s, s))(s, x.reshape(6, 2, 4))
        return plain, jax.checkpoint(lambda x: scan(lambda s, x: (x * s, s))(s, x.reshape(6, 2, 4)))(x)

    cases = {issue1316: 0.7, issue1361: 0.5, issue810: 0.3, issue757: 0.5, hoisting_consts: 1.0,
             fixpoint_instantiate: 1.0, issue8152: 0.5, cumprod: np.random.RandomState(4).randn(48)}
    run = jax.jit(lambda scan, xs: [outputs_and_grads(partial(f, scan))(x) for f, x in zip(cases, xs)],
                  static_argnums=0)
    assert_close(run(unroll_as_scan, list(cases.values())), run(lax_scan, list(cases.values())))


def test_scan_forwarding_correctness():
    """test_scan_constification_correctness, test_scan_forwarding_correctness and
    test_scan_vjp_forwarding_correctness, on a sample of their grids: carries and inputs passed
    through unchanged, permuted, mixed with computed ones and with constants (a custom_jvp whose
    rule has constants); values and the VJP with respect to the initial carry and the inputs."""

    @jax.custom_jvp
    def foo(x):
        return 3.0 * x

    @foo.defjvp
    def foo_jvp(primals, tangents):
        (x,), (x_dot,) = primals, tangents
        return foo(x), jnp.prod(jnp.ones(3) / 2) * x_dot

    def body_for(seed, num_consts, num_carry_fwds, num_input_fwds):
        rng = np.random.RandomState(seed)
        num_carry, num_xs = num_carry_fwds + 4, num_input_fwds + 2
        carry_perm, xs_perm, ys_perm = rng.permutation(num_carry), rng.permutation(num_xs), rng.permutation(num_xs + 1)
        carry_iperm = np.argsort(carry_perm)
        consts = [jnp.array(rng.randn(3)) for _ in range(num_consts)]

        def body(c, x):
            c = [c[i] for i in carry_iperm]
            fwd, rest = c[:num_carry_fwds], c[num_carry_fwds:]
            rest = [jnp.sin(v) * sum(jnp.sum(k) for k in consts) for v in rest]
            new_c = [*fwd, *rest]
            new_c = [new_c[i] for i in carry_perm]
            new_c = [foo(new_c[0]), *new_c[1:]]
            x = [x[i] for i in xs_perm]
            x_fwd, x_rest = x[:num_input_fwds], x[num_input_fwds:]
            y = [*x_fwd, *[jnp.cos(v) * sum(jnp.sum(k) for k in consts) for v in x_rest], 0]
            return new_c, [y[i] for i in ys_perm]

        init = list(map(jnp.array, rng.uniform(size=(num_carry, 3))))
        xs = list(map(jnp.array, rng.uniform(size=(num_xs, 2, 3))))
        return body, (init, xs)

    grid = [body_for(*settings) for settings in [(0, 0, 0, 0), (1, 2, 1, 2), (2, 1, 3, 1)]]
    run = jax.jit(lambda scan, args: [outputs_and_grads(scan(body), (0, 1))(*a) for (body, _), a in zip(grid, args)],
                  static_argnums=0)
    args = [a for _, a in grid]
    assert_close(run(unroll_as_scan, args), run(lax_scan, args))


def test_vmap_axis_env_and_readonly_carry():
    """test_caches_depend_on_axis_env (`lax.axis_size` of the vmapped axis inside the body) and
    test_scan_readonly_carry_optimization (an unroll that passes its carry through, inside a
    `cond` on a batched predicate; see the module docstring for its `out_axes`)."""
    size = lambda: unroll_as_scan(lambda _, __: (lax.axis_size("i"), None))(0, jnp.zeros(1))[0]
    assert jax.vmap(size, axis_name="i", axis_size=2, out_axes=None)() == 2
    assert jax.vmap(size, axis_name="i", axis_size=3, out_axes=None)() == 3

    def f(x, y):
        g = lambda _, y: unroll_as_scan(lambda y, _: (y, None))(y, jnp.zeros(1))[0]
        return lax.cond(x < 0, g, g, x, y)

    np.testing.assert_array_equal(jax.vmap(f, (0, None))(jnp.arange(3.0), 3.0), [3.0, 3.0, 3.0])




def test_scan_diff_of_print():
    """test_scan_diff_of_print: a differentiated unroll keeps the step's debugging effects (JAX
    looks for the print in the jaxpr; here the callback's calls are counted)."""
    calls = []

    def f(c, _):
        jax.debug.callback(lambda c: calls.append(float(c)), c, ordered=True)
        return c + 1, None

    counted = []
    for scan in (lax_scan, unroll_as_scan):
        jax.value_and_grad(lambda x: scan(f)(x, jnp.zeros(2))[0])(1.0)
        jax.effects_barrier()
        counted.append(list(calls))
        calls.clear()
    assert counted[0] == [1.0, 2.0] and counted[1] == counted[0]
