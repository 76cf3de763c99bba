"""Deep models from Cells (stacked, dropout, embedding) and generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from steps import mse


def test_stacked_cells_equal_the_stacked_step():
    l1, l2 = jb.lstm(5), jb.gru(4)
    model = jb.with_readout(jb.stacked(l1, l2), 3)
    params = model.init(jax.random.key(0), 2, jnp.float64)
    assert params["cell"][0]["W_x"].shape == (2, 20) and params["cell"][1]["W_x"].shape == (5, 12)
    carry = model.initial_carry((3,), jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (10, 3, 2))
    plain = jb.stacked(l1.step, l2.step)
    _, ys = jb.unroll(model.step, params, carry, xs)
    _, ref_ys = jb.reference_unroll(plain, params["cell"], carry, xs)
    np.testing.assert_allclose(ys, ref_ys @ params["W_hy"] + params["b_y"][None, None], rtol=1e-12)


def test_dropout_key_travels_in_x():
    model = jb.with_readout(jb.stacked(jb.lstm(6), jb.lstm(6), dropout=0.5), 2)
    params = model.init(jax.random.key(0), 3, jnp.float64)
    carry = model.initial_carry((4,), jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (8, 4, 3))
    keys = jax.random.key_data(jax.random.split(jax.random.key(2), 8))
    _, plain = jb.unroll(model.step, params, carry, xs)
    _, off = jb.unroll(model.step, params, carry, (xs, None))
    _, on = jb.unroll(model.step, params, carry, (xs, keys))
    _, again = jb.unroll(model.step, params, carry, (xs, keys))
    np.testing.assert_array_equal(plain, off)
    np.testing.assert_array_equal(on, again)  # the key, not hidden state, decides the mask
    assert not np.allclose(on, plain)
    targets = jnp.zeros((8, 4, 2))
    assert jb.check_grads(model.step, mse, params, carry, (xs, keys), targets, clip_norm=0.1, rtol=1e-10) < 1e-10
    with pytest.raises(ValueError, match=r"dropout must be a float in \[0, 1\)"):
        jb.stacked(jb.lstm(6), jb.lstm(6), dropout=1.0)
    with pytest.raises(TypeError, match="stacked\\(dropout=0.5\\) needs Cells"):
        jb.stacked(jb.lstm(6).step, dropout=0.5)


def test_embedding_ids_equal_one_hot_and_generate():
    model = jb.with_readout(jb.embedding(jb.gru(8), vocab_size=7, dim=4), 7)
    params = model.init(jax.random.key(0), 7, jnp.float64)
    carry = model.initial_carry((2,), jnp.float64)
    ids = jax.random.randint(jax.random.key(1), (9, 2), 0, 7)
    _, by_id = jb.unroll(model.step, params, carry, ids)
    _, by_one_hot = jb.unroll(model.step, params, carry, jax.nn.one_hot(ids, 7, dtype=jnp.float64))
    np.testing.assert_allclose(by_id, by_one_hot, rtol=1e-12)
    # ids outside [0, vocab) are clamped into it, not read as NaN
    wild = ids.at[0, 0].set(-3).at[4, 1].set(7).at[8, 0].set(100)
    _, by_wild_id = jb.unroll(model.step, params, carry, wild)
    np.testing.assert_allclose(by_wild_id, jb.unroll(model.step, params, carry, jnp.clip(wild, 0, 6))[1], rtol=1e-12)
    ce = lambda logits, t: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[..., None], -1))
    assert jb.check_grads(model.step, ce, params, carry, ids, jnp.roll(ids, -1, 0), truncation=(2, 5), rtol=1e-10) < 1e-10
    greedy = jb.generate(model.step, params, carry, ids[:3], 6)
    # greedy decoding is the argmax of the model run on its own output
    _, logits = jb.unroll(model.step, params, carry, jnp.concatenate([ids[:3], greedy[:-1]]))
    np.testing.assert_array_equal(greedy, jnp.argmax(logits[2:], -1))
    sampled = jb.generate(model.step, params, carry, ids[:3], 6, key=jax.random.key(3), temperature=0.7)
    assert sampled.shape == (6, 2) and sampled.dtype == ids.dtype
    with pytest.raises(ValueError, match="takes input_size=7"):
        model.init(jax.random.key(0), 5)
    with pytest.raises(ValueError, match="prompt must be int token ids"):
        jb.generate(model.step, params, carry, jnp.ones((3, 2)), 4)
    with pytest.raises(ValueError, match="temperature must be a float > 0"):
        jb.generate(model.step, params, carry, ids[:3], 4, key=jax.random.key(0), temperature=0.0)
