"""`python -m examples.experiments --modern`: minGRU and LRU against the LSTM on the adding problem.

The cells whose recurrence is linear in the carry (`jaxbptt.mingru`, `jaxbptt.lru`) trained as the
classic cells are, through their sequential `step` and `jaxbptt.make_train_step` (the parallel form
computes the same gradient), on the adding problem at T = 100, all seeds of a row in one compiled
call. Each model is one recurrent layer and a linear read-out of its last output; the LSTM keeps the
classic run's Adam step size, the new cells get a larger one (see `modern_cells`). minGRU's gates
read the input, so `z_t * h~_t` can form "marker times value"; the LRU's state and output are
linear in the inputs, so one LRU layer with a linear read-out can only fit the best linear
predictor of the sum (the LRU paper stacks it with nonlinear layers).
"""

from __future__ import annotations

import numpy as np

import jaxbptt as jb
from jaxbptt import tasks

from .experiments import Result, _adding_runs, _timed


def modern_cells(hidden: int) -> dict:
    """name -> (cell, Adam step size): the LSTM at the 1e-3 of the classic adding run; minGRU reached
    MSE 0.014 with 3e-3 and 0.002 with 1e-2 (2,000 iterations), so the new cells get 1e-2."""
    return {"LSTM": (jb.lstm(hidden), 1e-3), "minGRU": (jb.mingru(hidden), 1e-2),
            "LRU": (jb.lru(hidden, r_min=0.9, r_max=0.999), 1e-2)}


def run_modern(quick: bool = False, seeds: int = 2, progress=None, models=("LSTM", "minGRU", "LRU")) -> list[Result]:
    """The cells named in `models` on the adding problem; `quick` shrinks it to a smoke run (its
    results mean nothing)."""
    length, hidden, iterations = (10, 8, 20) if quick else (100, 64, 2000)
    plan = [(name, modern_cells(hidden)[name]) for name in models]
    results = []
    for name, (cell, rate) in (progress(plan) if progress else plan):
        (mse, curves), seconds = _timed(_adding_runs, cell, length, iterations, seeds, 32, rate)
        results.append(Result(f"adding, T={length}", f"{name} (lr {rate:g})", seeds, iterations, "test MSE", np.asarray(mse),
                              f"{tasks.ADDING_BASELINE_MSE:.3f}", seconds, np.asarray(curves)))
    return results
