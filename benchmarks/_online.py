"""online_tbptt's memory against stream length: XLA temp bytes of the compiled `update`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import jaxbptt as jb

from ._problems import make_problem, mse


SMOKE = dict(lengths=(20, 40), B=2, D=3, H=4, truncation=(2, 4))


def online_memory(lengths=(1_000, 10_000, 100_000), cell="lstm", B=16, D=32, H=128, truncation=(10, 40)) -> list[dict]:
    """Compile `update` for streams of each length (the same k1, k2) and read its temp memory;
    `xs` and `targets` are arguments, not temporaries, so they are excluded as the target asks."""
    problem = make_problem(cell, 20, B, D, H)
    trainer = jb.online_tbptt(problem.step, mse, optax.adam(1e-3), truncation=truncation)
    state = trainer.init(problem.params, problem.carry)
    rows = []
    for T in lengths:
        xs = jax.ShapeDtypeStruct((T, B, D), jnp.float32)
        targets = jax.ShapeDtypeStruct((T, B, problem.targets.shape[-1]), jnp.float32)
        compiled = jax.jit(trainer.update).lower(state, xs, targets).compile()
        rows.append({"cell": cell, "T": T, "B": B, "D": D, "H": H, "truncation": list(truncation),
                     "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)})
    return rows


def print_online(rows) -> None:
    base = rows[0]["temp_bytes"]
    print(f"\n== online: online_tbptt.update temp memory against stream length (truncation={tuple(rows[0]['truncation'])}, "
          f"{rows[0]['cell']}, B={rows[0]['B']}, D={rows[0]['D']}, H={rows[0]['H']})")
    for r in rows:
        print(f"  T={r['T']:>7d}  temp {r['temp_bytes'] / 1e6:8.2f} MB  ({r['temp_bytes'] / base:.3f} x T={rows[0]['T']})")
