"""Property-based: random lengths, batches, combinators and every gradient option crossed with the
others; the hand-written reverse scan equals the autodiff oracle (the built-in cells and steps
crossed with the methods and layouts are tests/test_methods.py's). Derandomised (no database, no
deadline), so runs repeat."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import jaxbptt as jb
from steps import problem


def test_results_are_bitwise_deterministic():
    step, loss_fn, *args = problem("lstm", T=29, B=3, H=8)
    f = jb.value_and_grad(step, loss_fn, truncation=(5, 12), clip_norm=0.1, argnums=(0, 1, 2))
    first = jax.jit(f)(*args)
    again = jax.jit(f)(*args)  # the same compiled program, run again
    fresh = jax.jit(jb.value_and_grad(step, loss_fn, truncation=(5, 12), clip_norm=0.1, argnums=(0, 1, 2)))(*args)
    for other in (again, fresh):
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(first))


# ---- every option combined with every other, on small pytree steps ---------------------------------

def _pytree_step(p, c, x):
    """Dict carry (a vector state and a scalar per row), tuple output."""
    h = jnp.tanh(x @ p["W"] + c["h"] @ p["U"] + p["b"][None])
    m = 0.5 * c["m"] + jnp.sum(h * p["v"][None], axis=-1)
    return {"h": h, "m": m}, (h, m)


def _pytree_loss(y, t):
    return jnp.mean((y[0] - t) ** 2) + 0.1 * jnp.mean(jnp.sin(y[1]))


def _pytree_init(key, d, h):
    k = jax.random.split(key, 3)
    return {"W": jax.random.normal(k[0], (d, h)) / jnp.sqrt(d), "U": 1.5 * jax.random.normal(k[1], (h, h)) / jnp.sqrt(h),
            "b": 0.1 * jnp.ones(h), "v": jax.random.normal(k[2], (h,))}


def combined_problem(wrapper, T, B, seed, H=3, D=2):
    k = jax.random.split(jax.random.key(seed), 5)
    carry = {"h": 0.1 * jax.random.normal(k[0], (B, H)), "m": jnp.zeros(B)}
    xs, targets = jax.random.normal(k[1], (T, B, D)), jax.random.normal(k[2], (T, B, H))
    params, step = _pytree_init(k[3], D, H), _pytree_step
    flags = jax.random.bernoulli(k[4], 0.7 if wrapper == "masked" else 0.3, (T, B))
    if wrapper == "stacked":
        first = jb.elman(H)
        step = jb.stacked(first.step, _pytree_step)
        params, carry = (first.init(k[4], D, jnp.float64), _pytree_init(k[3], H, H)), (jnp.zeros((B, H)), carry)
    elif wrapper == "masked":
        step, xs = jb.masked(step), (xs, flags)
    elif wrapper == "resettable":
        step, xs = jb.resettable(step, {"h": jnp.zeros(H), "m": jnp.zeros(())}), (xs, flags)
    return step, params, carry, xs, targets


@st.composite
def combinations(draw):
    T = draw(st.integers(1, 9))
    wrapper = draw(st.sampled_from(["plain", "masked", "stacked", "resettable"]))
    kind = draw(st.sampled_from(["none", "int", "pair", "traced"]))
    k1 = draw(st.integers(1, T + 1))
    truncation = {"none": None, "int": k1, "traced": k1, "pair": (k1, draw(st.integers(k1, 2 * T + 1)))}[kind]
    differentiable = (0, 1, 2) if wrapper in ("plain", "stacked") else (0, 1)  # masks and resets are bool
    return dict(
        wrapper=wrapper, T=T, B=draw(st.integers(1, 2)), seed=draw(st.integers(0, 2**16)), traced=kind == "traced",
        truncation=truncation,
        clip_norm=draw(st.one_of(st.none(), st.floats(0.05, 5.0))),
        remat=draw(st.one_of(st.none(), st.integers(1, T + 1), st.just("sqrt"),
                             st.builds(jb.Binomial, st.integers(1, 3), st.sampled_from([None, 1, 2])))),
        diagnostics=draw(st.booleans()),
        argnums=draw(st.sampled_from([0, 1, (0, 1)] + ([2, (0, 2), (0, 1, 2)] if 2 in differentiable else []))),
        unroll=draw(st.integers(1, 3)),
    )


def _grads(case, *, oracle=False, **override):
    """Gradients of the combined problem under the case's options (the oracle: reference options only)."""
    step, params, carry, xs, targets = combined_problem(case["wrapper"], case["T"], case["B"], case["seed"])
    options = {k: case[k] for k in ("truncation", "clip_norm", "argnums")} | override
    if not oracle:
        options |= {k: case[k] for k in ("remat", "diagnostics", "unroll") if k not in override}

    def run(params, truncation):
        make = jb.reference_value_and_grad if oracle else jb.value_and_grad
        return make(step, _pytree_loss, **(options | {"truncation": truncation}))(params, carry, xs, targets)

    k = options["truncation"]
    if case["traced"]:
        return jax.jit(run)(params, jnp.asarray(k)), run, params, k
    return jax.jit(run, static_argnums=1)(params, k), run, params, k


@settings(max_examples=3)
@given(combinations())
def test_every_combination_equals_the_oracle(case):
    aux, grads = _grads(case)[0]
    _, ref_grads = _grads(case, oracle=True)[0]
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12)
    if case["diagnostics"]:
        assert aux[2].adjoint_norm.shape == (case["T"],) and bool(jnp.all(jnp.isfinite(aux[2].adjoint_norm)))
    # Second derivatives: inactive clipping and memory policies leave them unchanged, active clipping
    # keeps them finite.
    if case["argnums"] not in (0, (0, 1), (0, 2), (0, 1, 2)):
        return

    def meta(**override):
        _, run, params, k = _grads(case, argnums=0, diagnostics=False, **override)
        return jax.grad(lambda p: sum(jnp.sum(g ** 2) for g in jax.tree.leaves(run(p, k)[1])))(params)

    plain = meta(clip_norm=None, remat=None)
    for g, r in zip(jax.tree.leaves(meta(clip_norm=1e6)), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12)
    if case["clip_norm"] is not None:
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(meta()))
