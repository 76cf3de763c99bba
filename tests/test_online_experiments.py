"""A smoke run of the online-gradient experiments at tiny sizes (the full run is a few minutes)."""

import jax.numpy as jnp
import numpy as np

import jaxbptt as jb
import examples.online_experiments as ex


def test_influence_balancing_fixed_point_and_smoke(capsys):
    step, loss_fn, theta_star = ex.balancing_problem()
    assert abs(theta_star + 1 / 6) < 1e-12
    # at the fixed point of theta = 0.5 (s[0] = -3 below the target 1), a rise of theta lowers s[0]
    # in the long run: the exact gradient is positive, the one-step truncated gradient negative
    params = {"theta": jnp.array(0.5, jnp.float32)}
    carry = jnp.full((ex.BALANCING_N,), 0.0, jnp.float32)
    for _ in range(200):
        carry, _ = step(params, carry, None)
    np.testing.assert_allclose(carry[0], -3.0, rtol=1e-4)
    xs, targets = jnp.zeros((400, 1), jnp.float32), jnp.ones((400,), jnp.float32)
    exact = jb.online_grad(step, loss_fn, jb.RTRL())(params, carry, xs, targets)[1]["theta"]
    truncated = jb.online_grad(step, loss_fn, jb.TBPTT(1, 1))(params, carry, xs, targets)[1]["theta"]
    assert exact > 0 > truncated
    rows = ex.influence_balancing(steps=20, seeds=1, methods=("TBPTT(5)", "UORO"))
    ex.print_balancing(rows)
    assert [r["method"] for r in rows] == ["TBPTT(5)", "UORO"]
    assert "influence balancing" in capsys.readouterr().out


def test_gradient_quality_smoke(capsys):
    rows = ex.gradient_quality(cells=("elman",), T=4, B=1, D=2, H=2, methods=("exact BPTT", "RTRL"))
    ex.print_quality(rows)
    assert [r["method"] for r in rows] == ["exact BPTT", "RTRL"]
    assert abs(rows[1]["cosine"] - 1) < 1e-5
    assert "cosine" in capsys.readouterr().out


def test_training_runs_and_figure_smoke(tmp_path, capsys):
    rows = ex.training_runs(steps=4, length=4, batch=2, H=2, methods=("exact BPTT", "RTRL"))
    # RTRL's gradient is exact BPTT's: the same training run
    assert rows[0]["losses"].shape == (4,) and rows[0]["losses"][-1] != rows[0]["losses"][0]
    np.testing.assert_allclose(rows[1]["losses"], rows[0]["losses"], rtol=1e-4)
    ex.print_training(rows)
    assert "adding problem" in capsys.readouterr().out
    ex.plot_training(rows, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 0
