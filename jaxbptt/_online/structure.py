"""Structure found from a recurrent step at trace time, for the online-gradient methods:
SnAp's sparsity pattern and its influence stored on that pattern, and UORO's independent examples.

Both are read off Jacobians of the step at deterministic generic points (`generic`), evaluated
concretely while tracing (`concrete`), so they cost nothing per call. The step is evaluated
through `sparsity.structural`, so that an entry that vanishes at those points only because of the
data there (a ReLU unit inactive, an embedding row not looked up) is still found.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .sparsity import structural


def generic(tree, seed, fill=0):
    """Deterministic generic values in [-0.1, 0.1] shaped like `tree`'s float leaves (cosines of an
    irrational stride, in NumPy: nothing to compile); other leaves (flags, indices) all `fill`.
    Small, so that no activation saturates: a saturated tanh has an exactly zero derivative in
    float32, which would read as a structural zero."""
    leaves, structure = jax.tree.flatten(tree)
    out = []
    for i, leaf in enumerate(leaves):
        shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.floating):
            phase = np.arange(np.prod(shape, dtype=int)).reshape(shape) * 0.6180339887 + (seed * 7.31 + i * 1.37)
            out.append((0.1 * np.cos(phase * 2.7182818)).astype(dtype))
        else:
            out.append(np.full(shape, fill, dtype))
    return jax.tree.unflatten(structure, out)


def concrete(name, fn, *points):
    """`jax.jit(fn)(*point)` as NumPy at trace time, for each tuple of arguments in `points`: the
    static structure the sparse layouts are built on. One compiled program for all the points (op
    by op, each of the Jacobians' many small operations would compile on its own); compiled ahead
    of time, it runs at once even while an outer `jit` is tracing."""
    if any(isinstance(value, jax.core.Tracer) for value in jax.make_jaxpr(fn)(*points[0]).consts):
        raise ValueError(f"{name} is found from the step at generic points at trace time, which needs a step that "
                         "does not close over traced values (pass them in params or xs instead).")
    compiled = jax.jit(fn).lower(*points[0]).compile()
    return [jax.tree.map(np.asarray, compiled(*point)) for point in points]


def pattern(flat_step, n: int, draws: int, theta, c, x):
    """SnAp's mask (|params| x |carry|, NumPy) and the carry Jacobian's pattern (|carry| x |carry|):
    the structural non-zeros of the influence after n steps from zero, `M_1 = pattern(I)`,
    `M_{k+1} = M_1 | M_k pattern(D)^T`. The Jacobians are those of the step's structural surrogate
    (`sparsity.structural`: a ReLU, a `where`, an embedding lookup reach every input they can reach
    at some point), OR'ed over `draws` generic points (params, carry and float inputs generic; flag
    and index inputs 0 and 1 in turn) against an entry that vanishes at one point by chance."""
    surrogate = structural(flat_step)

    def jacobians(th, cc, xx):
        immediate, carry_jac = jax.jacrev(lambda th, cc: surrogate(th, cc, xx)[0], argnums=(0, 1))(th, cc)
        return immediate.T != 0, carry_jac != 0

    points = [(generic(theta, 3 * d), generic(c, 3 * d + 1), generic(x, 3 * d + 2, d % 2)) for d in range(draws)]
    found = concrete("SnAp's sparsity pattern", jacobians, *points)
    immediate, carry_pattern = (np.any(np.stack(a), axis=0) for a in zip(*found))
    mask = immediate
    for _ in range(n - 1):
        mask = immediate | (mask.astype(np.int64) @ carry_pattern.T.astype(np.int64) > 0)
    return mask, carry_pattern


def _color(conflicts) -> np.ndarray:
    """A greedy colouring of a symmetric boolean conflict matrix: nodes of one colour never conflict."""
    colors = np.full(conflicts.shape[0], -1, np.int32)
    for node in range(conflicts.shape[0]):
        taken = colors[conflicts[node] & (colors >= 0)]
        colors[node] = np.setdiff1d(np.arange(taken.size + 1), taken)[0]
    return colors


class Sparse(NamedTuple):
    """SnAp's influence stored on its pattern only: entry e is (param rows[e], carry cols[e]).
    `same_row[e]` lists the entries of row rows[e] (padded with nnz, an always-zero slot), where
    `D_t J_{t-1}` at e needs the carry Jacobian D[cols[e], cols[same_row[e]]] (`d_live`: the
    pattern of D there). D comes from one forward pass per colour of `d_colors` (columns of D
    whose rows do not meet share a pass), the immediate Jacobian I from one reverse pass per
    colour of `i_colors` (carry units with disjoint parameter sets share a pass)."""

    n_params: int
    rows: np.ndarray
    cols: np.ndarray
    same_row: np.ndarray
    d_live: np.ndarray
    d_colors: np.ndarray
    i_colors: np.ndarray

    @staticmethod
    def build(mask, carry_pattern) -> "Sparse":
        rows, cols = (a.astype(np.int32) for a in np.nonzero(mask))  # row-major: each row's entries are contiguous
        counts = mask.sum(1)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        width = max(int(counts.max(initial=0)), 1)
        offsets = np.arange(width)[None]
        same_row = np.where(offsets < counts[rows][:, None], starts[rows][:, None] + offsets, rows.size)
        same_row = same_row.astype(np.int32)
        padded_cols = np.concatenate([cols, [0]])[same_row]
        d_live = carry_pattern[cols[:, None], padded_cols] & (same_row < rows.size)
        m = mask.astype(np.int64)
        d_colors = _color(carry_pattern.T.astype(np.int64) @ carry_pattern.astype(np.int64) > 0)
        i_colors = _color(m.T @ m > 0)
        return Sparse(mask.shape[0], rows, cols, same_row, d_live, d_colors, i_colors)

    def cheaper_than_dense(self) -> bool:
        """The gathers and passes cost less than the dense update's one forward pass per parameter."""
        passes = self.d_colors.max(initial=0) + self.i_colors.max(initial=0) + 3
        return self.same_row.size < self.n_params * self.d_colors.size and passes < self.n_params


def sparse_recursion(flat_step, step_and_loss, sp: Sparse):
    """SnAp's update `J_t = M * (D_t J_{t-1} + I_t)` on the pattern's entries only: for entry
    e = (p, j), `sum_{k in row p} D[j, k] J[p, k] + I[p, j]`, since J_{t-1} is zero off the
    pattern. Equals the masked dense update, for a pattern that holds the step's non-zeros.
    Returns the recursion's `(init, advance, contract)` over the pattern's entries."""
    nnz = sp.rows.size
    d_tangents = jnp.asarray(sp.d_colors[None] == np.arange(sp.d_colors.max(initial=0) + 1)[:, None])
    i_cotangents = jnp.asarray(sp.i_colors[None] == np.arange(sp.i_colors.max(initial=0) + 1)[:, None])
    d_at = (sp.d_colors[np.concatenate([sp.cols, [0]])[sp.same_row]], sp.cols[:, None])
    i_at = (sp.i_colors[sp.cols], sp.rows)

    def contract(influence, g_c):
        """g_c . J, summed into each entry's parameter."""
        return jax.ops.segment_sum(g_c[sp.cols] * influence, sp.rows, sp.n_params)

    def advance(theta, influence, c, x, target, key):
        (new, loss), vjp = jax.vjp(step_and_loss(x, target), theta, c)
        g_theta, g_c = vjp((jnp.zeros_like(new), jnp.ones_like(loss)))
        grad = g_theta + contract(influence, g_c)  # dL_t/dcarry_{t-1} . J_{t-1}
        # column sums of D and rows of I over each colour: no two members meet, so each sum is one entry
        carry_tangent = lambda t: jax.jvp(lambda cc: flat_step(theta, cc, x)[0], (c,), (t.astype(c.dtype),))[1]
        d_sums = jax.vmap(carry_tangent)(d_tangents)
        i_sums = jax.vmap(lambda m: vjp((m.astype(new.dtype), jnp.zeros_like(loss)))[0])(i_cotangents)
        padded = jnp.concatenate([influence, jnp.zeros((1,), influence.dtype)])
        propagated = jnp.sum(jnp.where(sp.d_live, d_sums[d_at], 0) * padded[sp.same_row], axis=1)
        new_influence = (propagated + i_sums[i_at]).astype(influence.dtype)
        return new_influence, new, loss, grad.astype(theta.dtype)

    return (lambda theta, c: jnp.zeros((nnz,), c.dtype)), advance, contract


def examples(flat_step, carry, theta, c, x):
    """UORO's independent examples: the rows of the carry's leading axis (every leaf's, of one
    size) when the step does not couple them (checked on its structural surrogate at a generic
    point with 2 log2(rows) forward passes: rows whose index has bit b set, then clear, must not
    reach the others), else one.
    Returns each flat carry entry's example and the number of examples."""
    leaves = jax.tree.leaves(carry)
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else 0 for leaf in leaves}
    rows = sizes.pop() if len(sizes) == 1 else 0
    one = np.zeros(c.size, np.int32), 1
    if rows < 2:
        return one
    ids = np.concatenate([np.broadcast_to(np.arange(rows).reshape((rows,) + (1,) * (jnp.ndim(leaf) - 1)),
                                          jnp.shape(leaf)).ravel() for leaf in leaves]).astype(np.int32)
    bits = [(ids >> b) & 1 == side for b in range(int(rows - 1).bit_length()) for side in (0, 1)]

    def leaks(th, cc, xx):
        f = lambda cc: structural(flat_step)(th, cc, xx)[0]
        return [jnp.any(jnp.where(sel, 0, jax.jvp(f, (cc,), (jnp.where(sel, 1, 0).astype(c.dtype),))[1]) != 0)
                for sel in bits]

    [found] = concrete("UORO's examples", leaks, (generic(theta, 0), generic(c, 1), generic(x, 2)))
    return one if any(found) else (ids, rows)
