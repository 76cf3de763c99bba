"""Every method gives the results the options define: the reverse scan, autodiff and checkpointed
autodiff, and the automatic choice, each against an oracle that shares no code with them
(tests/oracle.py), crossed over the options, layouts and argnums, first and second derivatives;
and the choice itself: which method the cost model picks for which step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

import jaxbptt as jb
import oracle
from jaxbptt._core import call as calls
from jaxbptt._core import cost
from steps import problem

ENGINES = ("auto", "reverse", "autodiff", jb.Autodiff(checkpoint=True))


def _aux_loss(loss_fn):
    return lambda y, t: (loss_fn(y, t), {"y0": jnp.sum(jax.tree.leaves(y)[0])})


@st.composite
def cases(draw):
    T = draw(st.integers(0, 7))
    truncation = draw(st.one_of(st.none(), st.integers(1, 4),
                                st.integers(1, 3).flatmap(lambda k1: st.tuples(st.just(k1), st.integers(k1, 7)))))
    return dict(
        # built-in kernels at a batch where `auto` takes autodiff (32 rows) and the engine (2), and a
        # generic step
        name=draw(st.sampled_from(["lstm", "gru", "elman", "two_layer", "tuple"])), T=T, B=draw(st.sampled_from([2, 32])),
        truncation=truncation, clip_norm=draw(st.sampled_from([None, 0.05, 3.0])),
        clip_scope=draw(st.sampled_from(["batch", "example"])), time_axis=draw(st.sampled_from([0, 1])),
        argnums=draw(st.sampled_from([0, 1, 2, (0, 2), (0, 1, 2)])), has_aux=draw(st.booleans()),
        final_loss=draw(st.booleans()), remat=draw(st.sampled_from([None, None, jb.Every(2), jb.Binomial(2)])),
    )


def _swap(tree):
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), tree)


def _case(**over):
    return dict(dict(name="lstm", T=6, B=32, truncation=None, clip_norm=None, clip_scope="batch", time_axis=0,
                     argnums=0, has_aux=False, final_loss=False, remat=None), **over)


@settings(max_examples=5)
@given(cases())
@example(_case(truncation=(2, 5), clip_norm=0.05, clip_scope="example", time_axis=1, argnums=(0, 1, 2),
               has_aux=True, final_loss=True))
@example(_case(name="two_layer", B=2, truncation=3, clip_norm=0.05, argnums=(0, 2), remat=jb.Every(2)))
@example(_case(name="gru", B=2, T=0, time_axis=1, argnums=(0, 1, 2), final_loss=True))
def test_every_method_equals_the_oracle(case):
    step, loss_fn, params, carry, xs, targets = problem(case["name"], T=case["T"], B=case["B"], H=3, D=2)
    final_loss = (lambda c: jnp.sum(jnp.sin(jax.tree.leaves(c)[0]))) if case["final_loss"] else None
    options = {k: case[k] for k in ("truncation", "clip_norm", "clip_scope", "time_axis", "argnums", "has_aux")}
    (ref_loss, ref_final), ref = oracle.value_and_grad(step, loss_fn, params, carry, xs, targets,
                                                       final_loss=final_loss, **{k: case[k] for k in (
                                                           "truncation", "clip_norm", "clip_scope")})
    ref = {0: ref[0], 1: ref[1], 2: _swap(ref[2]) if case["time_axis"] else ref[2]}
    ref = ref[case["argnums"]] if isinstance(case["argnums"], int) else tuple(ref[a] for a in case["argnums"])
    data = (_swap(xs), _swap(targets)) if case["time_axis"] else (xs, targets)
    loss = _aux_loss(loss_fn) if case["has_aux"] else loss_fn
    for engine in ENGINES:
        remat = case["remat"] if engine in ("auto", "reverse") else None  # the others refuse a policy
        out, grads = jax.jit(jb.value_and_grad(step, loss, engine=engine, final_loss=final_loss, remat=remat,
                                               **options))(params, carry, *data)
        chex.assert_trees_all_close((out[0], out[1], grads), (ref_loss, ref_final, ref), rtol=1e-9, atol=1e-12)
        if case["has_aux"]:
            assert out[2]["y0"].shape == (case["T"],)


CHUNKED_EXAMPLE_CLIP = dict(truncation=3, clip_norm=0.05, clip_scope="example")
WILLIAMS_PENG_CLIP = dict(truncation=(2, 5), clip_norm=0.5)


# Both truncations on the engine's and autodiff's side of the cost model (B=2 and B=32 under `auto`).
@pytest.mark.parametrize("name, B, options", [("lstm", 2, WILLIAMS_PENG_CLIP), ("lstm", 32, CHUNKED_EXAMPLE_CLIP),
                                              ("two_layer", 2, CHUNKED_EXAMPLE_CLIP), ("lstm", 32, WILLIAMS_PENG_CLIP)])
def test_second_derivatives_are_those_of_the_defined_gradient(name, B, options):
    """`jax.jvp` of the gradient equals central differences of the oracle's gradient, on every
    method: a meta-gradient does not depend on the batch size or the method."""
    step, loss_fn, params, carry, xs, targets = problem(name, T=9, B=B, H=3, D=2)
    direction = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)), params)
    grad = lambda p: oracle.value_and_grad(step, loss_fn, p, carry, xs, targets, **options)[1][0]
    eps = 1e-5
    moved = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)
    finite = jax.tree.map(lambda a, b: (a - b) / (2 * eps), grad(moved(1)), grad(moved(-1)))
    for engine in ENGINES:
        f = jb.value_and_grad(step, loss_fn, engine=engine, **options)
        _, tangent = jax.jvp(lambda p: f(p, carry, xs, targets)[1], (params,), (direction,))
        chex.assert_trees_all_close(tangent, finite, rtol=1e-6, atol=1e-8)


def test_unroll_on_every_method_under_jit_vmap_and_reverse():
    step, _, params, carry, xs, _ = problem("lstm", T=11)

    def loss(p, engine):
        final, ys = jb.unroll(step, p, carry, xs, truncation=3, clip_norm=0.1, reverse=True, engine=engine)
        return jnp.sum(ys**2) + jnp.sum(final.c)

    grads = [jax.jit(jax.grad(loss), static_argnums=1)(params, e) for e in ENGINES]
    for g in grads[1:]:
        chex.assert_trees_all_close(g, grads[0], rtol=1e-10)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a]), params)
    batched = jax.vmap(jax.grad(loss), in_axes=(0, None))(stacked, "autodiff")
    half = jax.grad(loss)(jax.tree.map(lambda a: a[1], stacked), "reverse")
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[1], batched), half, rtol=1e-10)
    exact = lambda p: jnp.sum(jb.unroll(step, p, carry, xs, engine=jb.Autodiff(checkpoint=True))[1] ** 2)
    jax.test_util.check_grads(exact, (params,), order=1, modes=["rev"])  # finite differences: exact BPTT only


def test_vmap_of_jit_of_unroll_with_unbatched_carry():
    """Per-example gradients: `jax.grad` of `vmap` over examples of a jitted loss calling `unroll`
    with an unbatched carry, batched and unbatched params, as through `lax.scan`."""
    w = jax.random.normal(jax.random.key(0), (4, 2))
    u = jax.random.normal(jax.random.key(1), (2, 2))
    step = lambda p, c, x: (lambda h: (h, h))(jnp.tanh(c @ p[1] + x @ p[0]))
    scan = lambda p, c, x: jax.lax.scan(lambda c_, x_: step(p, c_, x_), c, x)
    for T in (3, 7):
        xs, ts = jax.random.normal(jax.random.key(2), (3, T, 4)), jax.random.normal(jax.random.key(3), (3, T, 2))
        for run in (jb.unroll, scan):
            f = jax.jit(lambda p, c, x, t, run=run: jnp.sum((run(step, p, c, x)[1] - t) ** 2) if run is jb.unroll
                        else jnp.sum((run(p, c, x)[1] - t) ** 2))
            per_example = jax.grad(lambda p: jnp.sum(jax.vmap(f, (None, None, 0, 0))(p, jnp.zeros(2), xs, ts)))((w, u))
            batched_params = jax.grad(lambda p: jnp.sum(jax.vmap(f, (0, None, 0, 0))(p, jnp.zeros(2), xs, ts)))(
                jax.tree.map(lambda a: jnp.stack([a] * 3), (w, u)))
            batched_carry = jax.jit(jax.vmap(jax.grad(f), (None, 0, 0, 0)))((w, u), jnp.ones((3, 2)), xs, ts)
            if run is jb.unroll:
                got = (per_example, batched_params, batched_carry)
        chex.assert_trees_all_close(got, (per_example, batched_params, batched_carry), rtol=1e-10)


def _choice(step, params, carry, xs, targets, loss_fn, **options):
    call = calls.prepare(step, params, carry, xs, targets, loss=calls.make_loss(loss_fn, False, None), **options)
    return cost.choose(call, {})


def test_the_cost_model_picks_by_step_and_shape():
    # built-in cells: autodiff for short sequences at large batches, else the engine
    step, loss_fn, *args = problem("lstm", T=25, B=64, H=8)
    assert _choice(step, *args, loss_fn) == (jb.Autodiff(), None)
    step, loss_fn, *args = problem("gru", T=100, B=4, H=8)
    assert _choice(step, *args, loss_fn) == (jb.ReverseScan(), None)
    # a generic step of matrix products: the engine, storing its (leaner) residuals
    step, loss_fn, *args = problem("two_layer", T=100, B=4, H=8)
    assert _choice(step, *args, loss_fn) == (jb.ReverseScan(), True)
    # a leaky integrator: the engine stores more per step than autodiff, so carries only
    leaky = lambda p, h, x: (lambda h: (h, h))(0.9 * h + 0.1 * jnp.tanh(x @ p["W"] + h @ p["U"]))
    p = {"W": jnp.ones((3, 8)), "U": jnp.eye(8)}
    assert _choice(leaky, p, jnp.zeros((4, 8)), jnp.ones((200, 4, 3)), jnp.ones((200, 4, 8)),
                   oracle_mse) == (jb.ReverseScan(), False)
    # an inner gradient step whose parameters only scale it: autodiff, checkpointed once its residuals
    # outgrow the cache
    def sgd(log_lr, w, batch):
        x, t = batch
        loss, g = jax.value_and_grad(lambda w: jnp.mean((jnp.tanh(x @ w["A"]) @ w["B"] - t) ** 2))(w)
        return jax.tree.map(lambda a, d: a - jnp.exp(log_lr) * d, w, g), loss

    w = {"A": jnp.ones((8, 16)) / 8, "B": jnp.ones((16, 1)) / 16}
    for T, checkpoint in ((100, False), (1000, True)):
        batches = (jnp.ones((T, 32, 8)), jnp.ones((T, 32, 1)))
        assert _choice(sgd, jnp.zeros(()), w, batches, jnp.zeros(T), lambda y, t: y) == (
            jb.Autodiff(checkpoint=checkpoint), None)


def oracle_mse(y, t):
    return jnp.mean((y - t) ** 2)


@pytest.mark.parametrize("length, rows, elements, expected", [
    (25, 64, 2 * 64 * 128, True),  # short sequence at a large batch: any width
    (100, 64, 2 * 64 * 32, True),  # narrow carry at a large batch: any length
    (100, 64, 64 * 128, False),  # wide enough for the engine's per-block products to pay
    (25, 16, 16 * 32, False),  # small batches: the engine at every length and width
])
def test_short_or_narrow_large_batches_go_to_autodiff(length, rows, elements, expected):
    assert cost.prefers_autodiff(length, rows, elements) is expected


def test_options_only_the_engine_honours_keep_it_and_are_refused_elsewhere():
    step, loss_fn, *args = problem("lstm", T=25, B=64, H=4)
    for used in ({"remat": jb.Sqrt()}, {"diagnostics": True}, {"check_finite": True}, {"axis_name": "b"}):
        call = calls.prepare(step, *args, loss=calls.make_loss(loss_fn, False, None))
        assert cost.choose(call, used)[0] == jb.ReverseScan()
    call = calls.prepare(step, *args, loss=calls.make_loss(loss_fn, False, None), truncation=(2, 4))
    assert cost.choose(call, {})[0] == jb.ReverseScan()  # autodiff would re-run every window
    with pytest.raises(ValueError, match=r"engine='fast'"):
        jb.value_and_grad(step, loss_fn, engine="fast")
    with pytest.raises(ValueError, match=r"engine=Autodiff\(checkpoint=False\) does not honour remat=4, "
                                         r"diagnostics=True \(remat: .*; diagnostics: .*\)"):
        jb.value_and_grad(step, loss_fn, engine="autodiff", remat=4, diagnostics=True)
    with pytest.raises(ValueError, match=r"does not honour probe="):
        jb.unroll(step, *args[:3], engine=jb.Autodiff(checkpoint=True), probe=jb.diagnostics_probe(25))
    with pytest.raises(TypeError, match=r"Autodiff\(checkpoint=...\) must be a bool; got checkpoint='yes'"):
        jb.value_and_grad(step, loss_fn, engine=jb.Autodiff("yes"))


def test_row_mixing_steps_are_exact_over_many_blocks():
    """Batch normalisation over the rows (plain, and as custom_vjp and custom_jvp rules) at lengths
    spanning many engine blocks. A bias before the normalisation has a true gradient of zero, so it is
    compared in absolute terms, against the whole gradient's scale."""

    def bn(z):
        m = jnp.mean(z, axis=0, keepdims=True)
        return (z - m) / jnp.sqrt(jnp.mean((z - m) ** 2, axis=0, keepdims=True) + 1e-3)

    vjp_bn = jax.custom_vjp(bn)
    vjp_bn.defvjp(lambda z: (bn(z), z), lambda z, g: jax.vjp(bn, z)[1](g))
    jvp_bn = jax.custom_jvp(bn)
    jvp_bn.defjvp(lambda p, t: jax.jvp(bn, p, t))
    k = jax.random.split(jax.random.key(0), 4)
    q = {"W": jax.random.normal(k[0], (3, 5)), "U": 0.5 * jax.random.normal(k[1], (5, 5)), "b": 0.1 * jnp.ones(5),
         "g": 1.1 * jnp.ones(5), "V": jax.random.normal(k[2], (5, 2))}
    xs, ts = jax.random.normal(k[3], (64, 4, 3)), jnp.ones((64, 4, 2))
    for norm in (bn, vjp_bn, jvp_bn):
        step = lambda p, h, x, norm=norm: (lambda h: (h, h @ p["V"]))(
            jnp.tanh(p["g"][None] * norm(x @ p["W"] + h @ p["U"] + p["b"][None])))
        (_, _), got = jb.value_and_grad(step, oracle_mse, engine="reverse")(q, jnp.zeros((4, 5)), xs, ts)
        ref = oracle.value_and_grad(step, oracle_mse, q, jnp.zeros((4, 5)), xs, ts)[1][0]
        scale = jnp.sqrt(sum(jnp.sum(a ** 2) for a in jax.tree.leaves(ref)))
        for name in q:
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-9, atol=1e-12 * scale)


def test_zero_length_and_batch_major_input_gradients_on_every_method():
    step, loss_fn, params, carry, xs, targets = problem("gru", T=5, B=32, H=3, D=2)
    for engine in ENGINES:
        for T in (0, 5):
            f = jb.value_and_grad(step, loss_fn, argnums=(0, 2), time_axis=1, engine=engine)
            (loss, final), (_, dxs) = f(params, carry, _swap(xs[:T]), _swap(targets[:T]))
            assert dxs.shape == (32, T, 2)
            if T == 0:
                assert float(loss) == 0.0 and bool(jnp.all(final == carry))
