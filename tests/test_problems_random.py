"""State structures drawn at random (hypothesis) through the matrix of `test_problems.py`:
leaves of random shapes (0-d included) nested in tuples, lists and dicts."""

import pytest


pytest.importorskip("hypothesis")  # in the `dev` extra

from hypothesis import assume, given, HealthCheck, settings, strategies as st

from .problems import DIM, structure_from_shapes
from .test_problems import at_the_floor, PAIRS, run_case


_SHAPES = {1: [(), (1,)], 2: [(2,), (1, 2)], 3: [(3,), (3, 1)], 4: [(4,), (2, 2)]}


@st.composite
def _structures(draw):
    sizes, left = [], DIM
    while left:
        n = draw(st.integers(1, min(4, left)))
        sizes.append(n)
        left -= n
    shapes = [draw(st.sampled_from(_SHAPES[n])) for n in sizes]
    return shapes, draw(st.sampled_from(["tuple", "list", "dict"]))


# Each example compiles a few solves (~3 s): few examples, no deadline.
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    structure=_structures(),
    pair=st.sampled_from(PAIRS),
    problem=st.sampled_from(["linear0", "cos", "mlp", "robertson"]),
    dtype=st.sampled_from(["float32", "float64"]),
)
def test_random_structures(structure, pair, problem, dtype):
    shapes, nesting = structure
    assume(not at_the_floor(problem, *pair, dtype))
    run_case(problem, *pair, structure_from_shapes(shapes, nesting), True, dtype)
