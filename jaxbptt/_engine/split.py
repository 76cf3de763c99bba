"""Splitting a step at the points where its parameters enter the per-step computation.

A step's parameter gradient, summed over time, is the sum over every use of a parameter-derived
value of that use's VJP. `split_step` reads the step's jaxpr (nested `jit` calls inlined) and sorts
its values into three kinds: values computed from the parameters alone (`W`, `W.T`, `exp(log_a)`;
"hoisted": computed once, outside every loop), values that vary with the carry or the input, and
constants. A *site* is an equation that varies and reads a hoisted value (`h @ W`, `z + b`,
`h * gamma`, a `custom_vjp` function of `h` and `W`). Then:

- the reverse loop differentiates the step with respect to the carry, the input and a zero
  perturbation added to every site's output, so it emits each site's output cotangent and never
  touches a parameter;
- after a block, each site's hoisted inputs get their gradient from one VJP of the site mapped over
  the block's steps (for `h @ W`: one matrix product over time and batch), the site's varying
  inputs being recomputed forward for the block (or read from the stored carries);
- the hoisted values' gradients go back to the parameters through one VJP of the hoisted part.

Every piece is a JAX VJP of the step's own equations, so the result is exact for any step,
whatever its custom derivative rules do to the batch's rows: nothing is assumed about rows.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

_P, _V, _C = "params", "varying", "const"


class Site(NamedTuple):
    """One equation where hoisted values enter the per-step computation."""

    eqn: Any
    inputs: tuple  # per invar: ("param", i) / ("const", i): the i-th hoisted value; ("varying" | "literal", None)
    float_outs: tuple  # indices of the outputs that take a perturbation (inexact dtypes)
    same_cotangent_as: Optional[int] = None  # a later site whose output cotangent equals this one's


def _with_shared_cotangents(sites: list, jaxpr) -> list:
    """Mark each site whose only output feeds only an addition of the same shape that is itself a
    site (`h @ W` under `+ b`): both have the same output cotangent, so the loop emits it once."""
    uses: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, jex_core.Literal):
                uses.setdefault(v, []).append(eqn)
    index = {id(s.eqn): k for k, s in enumerate(sites)}
    out_vars = {v for v in jaxpr.outvars if not isinstance(v, jex_core.Literal)}
    sites = list(sites)
    for k in reversed(range(len(sites))):
        site = sites[k]
        if len(site.eqn.outvars) != 1 or site.eqn.outvars[0] in out_vars:
            continue
        (v,) = site.eqn.outvars
        users = uses.get(v, [])
        if len(users) != 1 or users[0].primitive.name not in ("add", "add_any") or id(users[0]) not in index:
            continue
        if users[0].outvars[0].aval.shape != v.aval.shape or users[0].outvars[0].aval.dtype != v.aval.dtype:
            continue
        j = index[id(users[0])]
        shared = sites[j].same_cotangent_as
        sites[k] = site._replace(same_cotangent_as=j if shared is None else shared)
    return sites


class SplitStep(NamedTuple):
    """The split of one step's flat jaxpr (see the module docstring)."""

    jaxpr: Any
    consts: list
    n_params: int
    n_carry: int
    hoisted_vars: list  # the non-varying values the varying equations read
    sites: list
    eqn_kind: dict
    output_from_carry: bool  # the output is a function of the new carry and the parameters alone

    def hoist(self, params_flat):
        """The hoisted values, from the parameters alone."""
        env = self._env(params_flat, None, None)
        for eqn in self.jaxpr.eqns:
            if self.eqn_kind[id(eqn)] != _V:
                _write(env, eqn.outvars, _bind(eqn, _read(env, eqn.invars)))
        return [env[v] for v in self.hoisted_vars]

    def per_step(self, hoisted, carry_flat, x_flat, perturbations=None, want=None, new_carry=None):
        """The values of `want` (default: the step's flat outputs; only the new carry's when
        `output_from_carry`) from the hoisted values, evaluating only the equations they need. With
        `perturbations` (one list per site), each site's float outputs get them added; with
        `new_carry` (flat), the new carry's variables are read from it rather than recomputed."""
        if want is None:
            want = self.jaxpr.outvars[: self.n_carry] if self.output_from_carry else self.jaxpr.outvars
        env = self._env(None, carry_flat, x_flat)
        env.update(zip(self.hoisted_vars, hoisted))
        if new_carry is not None:
            env.update(_carry_values(self.jaxpr, new_carry))
        needed = needed_equations(self.jaxpr, want, env)
        site_of = {id(s.eqn): (k, s) for k, s in enumerate(self.sites)}
        for eqn in self.jaxpr.eqns:
            if id(eqn) not in needed:
                continue
            outs = _bind(eqn, _read(env, eqn.invars))
            if perturbations is not None and id(eqn) in site_of and site_of[id(eqn)][1].same_cotangent_as is None:
                k, site = site_of[id(eqn)]
                outs = list(outs)
                for j, z in zip(site.float_outs, perturbations[k]):
                    outs[j] = outs[j] + z
            _write(env, eqn.outvars, outs)
        return _read(env, want)

    def outputs(self, hoisted, new_carry):
        """The step's flat output from the hoisted values and the new carry (`output_from_carry`)."""
        env = dict(zip(self.jaxpr.constvars, self.consts))
        env.update(zip(self.hoisted_vars, hoisted))
        env.update(_carry_values(self.jaxpr, new_carry))
        return evaluate(self.jaxpr, env, self.jaxpr.outvars[self.n_carry:])

    def zero_perturbations(self):
        return [[] if s.same_cotangent_as is not None else
                [jnp.zeros(s.eqn.outvars[j].aval.shape, s.eqn.outvars[j].aval.dtype) for j in s.float_outs]
                for s in self.sites]

    @staticmethod
    def varying_inputs(site: Site) -> list:
        """The site's varying inputs (variables), in order."""
        return [v for v, (kind, _) in zip(site.eqn.invars, site.inputs) if kind == "varying"]

    @staticmethod
    def site_vjp(site: Site, hoisted, varying_stacked, cotangents_stacked) -> dict:
        """The cotangents of the site's parameter-derived inputs (by hoisted index), summed over the
        leading axis of `varying_stacked` and `cotangents_stacked` (the block's steps)."""
        idx = sorted({i for kind, i in site.inputs if kind == "param"})

        def apply(own, varying):
            it, by_index = iter(varying), dict(zip(idx, own))
            args = [by_index[i] if kind == "param" else hoisted[i] if kind == "const"
                    else v.val if kind == "literal" else next(it)
                    for v, (kind, i) in zip(site.eqn.invars, site.inputs)]
            outs = _bind(site.eqn, args)
            return [outs[j] for j in site.float_outs]

        _, vjp = jax.vjp(lambda own: jax.vmap(apply, in_axes=(None, 0))(own, varying_stacked),
                         [hoisted[h] for h in idx])
        (d_own,) = vjp(cotangents_stacked)
        return dict(zip(idx, d_own))

    def _env(self, params_flat, carry_flat, x_flat):
        jaxpr, env = self.jaxpr, {}
        env.update(zip(jaxpr.constvars, self.consts))
        if params_flat is not None:
            env.update(zip(jaxpr.invars[: self.n_params], params_flat))
        if carry_flat is not None:
            rest = list(carry_flat) + list(x_flat)
            env.update(zip(jaxpr.invars[self.n_params:], rest))
        return env


def _carry_values(jaxpr, new_carry) -> dict:
    return {v: c for v, c in zip(jaxpr.outvars, new_carry) if not isinstance(v, jex_core.Literal)}


def needed_equations(jaxpr, want, known) -> set:
    """The ids of the equations needed to compute `want` from the variables in `known`."""
    missing = {v for v in want if not isinstance(v, jex_core.Literal) and v not in known}
    needed = set()
    for eqn in reversed(jaxpr.eqns):
        if any(v in missing for v in eqn.outvars):
            needed.add(id(eqn))
            missing.update(v for v in eqn.invars if not isinstance(v, jex_core.Literal) and v not in known)
    return needed


def evaluate(jaxpr, env: dict, want: list) -> list:
    """The values of `want`, evaluating only the equations of `jaxpr` they need beyond `env`."""
    needed = needed_equations(jaxpr, want, env)
    for eqn in jaxpr.eqns:
        if id(eqn) in needed:
            _write(env, eqn.outvars, _bind(eqn, _read(env, eqn.invars)))
    return _read(env, want)


def _read(env, variables):
    return [v.val if isinstance(v, jex_core.Literal) else env[v] for v in variables]


def _write(env, variables, values):
    for v, x in zip(variables, values):
        env[v] = x


def _bind(eqn, args):
    """Apply one equation, as `jax.core.eval_jaxpr` does."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(params, tuple):  # JAX < 0.7 returns (subfuns, params)
        subfuns, params = params
    with eqn.ctx.manager:
        outs = eqn.primitive.bind(*subfuns, *args, **params)
    return outs if eqn.primitive.multiple_results else [outs]


def _classify(jaxpr, n_params: int):
    """Each equation's kind, and each variable's: P (from parameters and constants only, reading at
    least one parameter), V (reads the carry or the input), C (constants only)."""
    var_kind = {v: _C for v in jaxpr.constvars}
    var_kind.update({v: (_P if i < n_params else _V) for i, v in enumerate(jaxpr.invars)})
    eqn_kind = {}
    for eqn in jaxpr.eqns:
        kinds = {var_kind[v] for v in eqn.invars if not isinstance(v, jex_core.Literal)}
        kind = _V if _V in kinds else (_P if _P in kinds else _C)
        eqn_kind[id(eqn)] = kind
        var_kind.update({v: kind for v in eqn.outvars})
    return eqn_kind, var_kind


def _output_equations(jaxpr, n_params: int, n_carry: int):
    """The equations computing the step's output from the new carry, when the output reads neither
    the carry nor the input other than through the new carry (a readout); else None."""
    known = {**_carry_values(jaxpr, [None] * n_carry), **{v: None for v in jaxpr.constvars}}
    outputs = jaxpr.outvars[n_carry:]
    eqns = needed_equations(jaxpr, outputs, known)
    step_inputs = set(jaxpr.invars[n_params:])
    reads_inputs = any(not isinstance(v, jex_core.Literal) and v in step_inputs
                       for e in jaxpr.eqns if id(e) in eqns for v in e.invars)
    direct = any(not isinstance(v, jex_core.Literal) and v in step_inputs for v in outputs)
    return eqns if eqns and not reads_inputs and not direct else None


def split_step(step, params, carry, x) -> SplitStep:
    """The split of `step` at these shapes. Nested `jax.jit` functions are inlined, so their
    parameter uses are sites. Where an output does not vary with the carry or the input (no site
    would carry its parameter gradient), the whole step is one opaque site instead."""
    p_flat, c_flat, x_flat = (jax.tree.leaves(t) for t in (params, carry, x))
    p_tree, c_tree, x_tree = (jax.tree.structure(t) for t in (params, carry, x))

    def flat_step(p, c, xx):
        new_c, y = step(p_tree.unflatten(p), c_tree.unflatten(c), x_tree.unflatten(xx))
        return jax.tree.leaves(new_c) + jax.tree.leaves(y)

    with jax.disable_jit():
        closed = jax.make_jaxpr(flat_step)(p_flat, c_flat, x_flat)
    eqn_kind, var_kind = _classify(closed.jaxpr, len(p_flat))
    if any(isinstance(v, jex_core.Literal) or var_kind[v] != _V for v in closed.jaxpr.outvars):
        closed = jax.make_jaxpr(jax.jit(flat_step))(p_flat, c_flat, x_flat)
        eqn_kind, var_kind = _classify(closed.jaxpr, len(p_flat))
    jaxpr = closed.jaxpr
    n_carry = len(c_flat)
    output_eqns = _output_equations(jaxpr, len(p_flat), n_carry)
    output_from_carry = output_eqns is not None
    output_eqns = output_eqns or set()
    hoisted_vars, position, sites = [], {}, []
    for eqn in jaxpr.eqns:
        if eqn_kind[id(eqn)] != _V or (output_from_carry and id(eqn) in output_eqns):
            continue
        marks = []
        for v in eqn.invars:
            if isinstance(v, jex_core.Literal) or var_kind[v] == _V:
                marks.append(("literal" if isinstance(v, jex_core.Literal) else "varying", None))
                continue
            if v not in position:
                position[v] = len(hoisted_vars)
                hoisted_vars.append(v)
            marks.append(("param" if var_kind[v] == _P else "const", position[v]))
        float_outs = tuple(j for j, o in enumerate(eqn.outvars) if jnp.issubdtype(o.aval.dtype, jnp.inexact))
        if float_outs and any(kind == "param" for kind, _ in marks):
            sites.append(Site(eqn, tuple(marks), float_outs))
    sites = _with_shared_cotangents(sites, jaxpr)
    for eqn in jaxpr.eqns:  # the output's equations read hoisted values too (evaluated in `outputs`)
        if id(eqn) in output_eqns and eqn_kind[id(eqn)] == _V:
            for v in eqn.invars:
                if not isinstance(v, jex_core.Literal) and var_kind[v] != _V and v not in position:
                    position[v] = len(hoisted_vars)
                    hoisted_vars.append(v)
    return SplitStep(jaxpr, list(closed.consts), len(p_flat), n_carry, hoisted_vars, sites, eqn_kind,
                     output_from_carry)
