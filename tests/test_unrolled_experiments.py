"""A smoke run of the unrolled-optimisation experiments at tiny sizes (the full run is minutes),
with the problems' definitions checked by hand."""

import jax
import jax.numpy as jnp
import numpy as np

import examples.unrolled_experiments as ex


def test_experiments_smoke(tmp_path, capsys):
    # the definitions: the toy's inner loss at x = (0, 100) is sin(100)^2; one Euler step of the
    # Lorenz system at a = 10, r = 28, b = 8/3, dt = 0.005; one SGD step with weight decay
    step, final_loss, theta, weights, (inputs, outputs) = ex.hyper_problem(T=3)

    def definitions():
        new, _ = step(theta, weights, (inputs[0], outputs[0]))
        hidden = jnp.tanh(inputs[0] @ weights["W1"] + weights["b1"][None])
        error = hidden @ weights["W2"] + weights["b2"][None] - outputs[0]
        lr, wd = jnp.exp(theta)
        return (ex.toy_loss(jnp.array([0.0, 100.0])), ex.lorenz_targets(1)[0], new["b2"],
                weights["b2"] - lr * (2 * jnp.mean(error) + wd * weights["b2"]))

    toy, z, b2, expected_b2 = jax.jit(definitions)()
    np.testing.assert_allclose(toy, np.sin(100.0) ** 2, rtol=1e-6)
    x, y, z0 = 1.2, 1.3, 1.6
    np.testing.assert_allclose(z, z0 + 0.005 * (x * y - 8 / 3 * z0), rtol=1e-6)
    np.testing.assert_allclose(b2, expected_b2, rtol=1e-5)

    schedule = ex.schedule_experiment(episodes=2, T=10, K=5, methods=("PES",))
    assert schedule[0]["thetas"].shape == (2, 2)
    grid = ex.schedule_grid(T=10, n=3)
    np.testing.assert_allclose(grid[1][1, 1], ex.schedule_objective(jnp.array([grid[0][1]] * 2), T=10), rtol=1e-5)
    ex.print_schedule(schedule, grid)
    ex.plot_schedule(schedule, grid, str(tmp_path / "schedule.png"))
    lorenz = ex.lorenz_experiment(iterations=2, T=20, W=10, groups=2, pairs=1, variance_keys=0, methods=("NRES",))
    assert lorenz[0]["a"].shape == (2,)
    ex.print_lorenz(lorenz)
    ex.plot_lorenz(lorenz, str(tmp_path / "lorenz.png"))
    hyper = ex.hyper_experiment(meta_steps=2, T=6, k=3, pairs=1, methods=("ES",))
    assert hyper[0]["losses"].shape == (2,)
    ex.plot_hyper([hyper], str(tmp_path / "hyper.png"))
    # RTRL's gradient is the exact one
    table = ex.estimator_table(keys=2, balancing_T=6, k=3, methods=("RTRL",), problems=("influence balancing",))
    assert [r["method"] for r in table] == ["exact BPTT", "RTRL"] and abs(table[1]["cosine_mean"] - 1) < 1e-5
    ex.print_estimators(table)
    out = capsys.readouterr().out
    assert "learning-rate schedule" in out and "Lorenz" in out and "estimators" in out
    assert all((tmp_path / name).stat().st_size > 0 for name in ("schedule.png", "lorenz.png", "hyper.png"))
