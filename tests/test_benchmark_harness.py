"""The benchmark harness (`benchmarks/_harness.py`): error measures, the backward-pass
report collector and result files, on tiny inputs."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np

import revdeq_jax as rdeq
from benchmarks import _harness as h


def test_rel_error():
    ref = [np.array([3.0, 4.0]), np.array([1.0])]
    assert h.rel_error(ref, ref) == {"worst_leaf": 0.0, "global": 0.0}
    err = h.rel_error([np.array([3.0, 4.0]), np.array([2.0])], ref)
    assert err["worst_leaf"] == 1.0
    assert math.isclose(err["global"], 1 / math.sqrt(26))
    bad = h.rel_error([np.array([np.nan, 4.0]), np.array([1.0])], ref)
    assert math.isnan(bad["worst_leaf"]) and math.isnan(bad["global"])


def test_reports_per_example_under_vmap():
    reports = h.Reports()
    solver = rdeq.Reversible(0.8, state_dtype=rdeq.ExactState())

    def loss(w, xs):
        def one(x):
            fn = lambda z, x: jnp.tanh(w * z + x)
            sol = rdeq.fixed_point(
                fn,
                jnp.zeros_like(x),
                x,
                solver=solver,
                adjoint=reports.adjoint("t"),
                max_steps=8,
                tol=0.0,
            )
            return jnp.sum(sol.value)

        return jnp.sum(jax.vmap(one)(xs))

    jax.grad(loss)(jnp.float32(0.5), jnp.ones((3, 4), jnp.float32))
    got = reports.take("t")
    assert got["solves"] == 3
    assert got["mismatch"] == 0 and got["abs"] == 0.0
    assert reports.take("t")["solves"] == 0  # taken once


def test_json_round_trip_and_table():
    data = {"a": [math.inf, math.nan, 1.5], "b": np.float32(2.0), "c": np.bool_(True)}
    back = h.from_json(json.loads(json.dumps(h.jsonable(data))))
    assert back["a"][0] == math.inf and math.isnan(back["a"][1]) and back["a"][2] == 1.5
    assert back["b"] == 2.0 and back["c"] is True
    assert h.md_table(["x", "y"], [[1, 2]]) == ["| x | y |", "|---|---:|", "| 1 | 2 |"]
