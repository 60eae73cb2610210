"""The default run's sampling of large matrices (``tests/_sampling.py``): what it keeps and what it marks."""
import itertools

import pytest

from _sampling import covering_indices, each_value, in_default_run, pairwise


def _pairs_of(rows):
    return {(i, a, j, b) for row in rows for (i, a), (j, b) in itertools.combinations(enumerate(row), 2)}


@pytest.mark.parametrize("shape", [(6, 4, 2, 2, 4), (6, 3), (2, 2, 2), (5,)])
def test_the_sample_holds_every_value_and_every_pair_of_the_full_product(shape):
    rows = list(itertools.product(*(range(n) for n in shape)))
    sample = [rows[k] for k in covering_indices(rows)]
    assert _pairs_of(sample) == _pairs_of(rows)
    for axis, size in enumerate(shape):
        assert {row[axis] for row in sample} == set(range(size))
    assert len(sample) <= len(rows)


def test_a_large_matrix_shrinks_to_about_the_product_of_its_two_largest_axes():
    rows = list(itertools.product(range(6), range(4), range(2), range(2), range(4)))
    assert len(covering_indices(rows)) <= 30  # 384 cases; at least 24 (6 x 4) are needed


def test_the_sample_covers_pairs_that_only_some_rows_have():
    # Not a full product: the pair ("b", "y") exists in one row only, which must then be chosen.
    rows = [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y"), ("a", "x")]
    assert [rows[k] for k in covering_indices(rows)] == [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")]


def test_the_sample_is_the_same_on_every_call():
    rows = list(itertools.product(range(6), range(4), range(3)))
    assert covering_indices(rows) == covering_indices(list(rows))


def test_pairwise_marks_the_cases_left_out_slow_and_keeps_ids_and_marks():
    params = [pytest.param(a, b, id=f"{a}-{b}", marks=pytest.mark.cuda if a == 0 else ())
              for a, b in itertools.product(range(3), range(3))]
    marked = pairwise(params, axes=lambda a, b: (a, b))
    assert [p.id for p in marked] == [p.id for p in params]
    assert [p.values for p in marked] == [p.values for p in params]
    kept = [p for p in marked if in_default_run(p)]
    assert len(kept) == 9  # two axes: every pair is needed, nothing can be left out
    plain = pairwise(list(itertools.product(range(3), range(3), range(3))), axes=lambda row: row)
    left_out = [p for p in plain if not in_default_run(p)]
    assert left_out and all(any(m.name == "slow" for m in p.marks) for p in left_out)
    assert all(any(m.name == "cuda" for m in p.marks) for p in marked if p.values[0] == 0)


def test_each_value_keeps_every_value_of_every_axis_once():
    params = list(itertools.product(["sgd", "adamw"], ["inf", "nan"], range(3)))
    marked = each_value(params, axes=lambda row: row)
    kept = [p.values[0] for p in marked if in_default_run(p)]
    assert len(kept) == 3  # the largest axis sets the size
    for axis in range(3):
        assert {row[axis] for row in kept} == {row[axis] for row in params}


def test_an_unknown_strength_is_refused():
    with pytest.raises(ValueError, match="strength must be 1"):
        covering_indices([(1, 2)], strength=3)
