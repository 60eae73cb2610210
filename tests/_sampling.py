"""Sampling a large test matrix for the default run; the whole matrix runs under ``--full``.

A matrix (opt level x optimizer x mode x ...) grows as a product, but most bugs need only two of its
axes to meet. :func:`pairwise` keeps a deterministic covering sample, in which every pair of values of
any two axes appears in at least one case, so every opt level still meets every optimizer, every mode
and every other axis value in the default run (:func:`each_value` keeps every value once, for costly
cases whose axes do not interact). The cases left out carry the ``slow`` marker:
``python -m pytest -q`` leaves them out, ``python -m pytest -q --full`` (or ``-m slow``) runs them.
"""
from __future__ import annotations

import itertools
from typing import Callable, Hashable, List, Sequence, Set, Tuple

import pytest

Axes = Callable[..., Sequence[Hashable]]
_ParameterSet = type(pytest.param(None))


def _combinations(row: Sequence[Hashable], strength: int) -> Set[Tuple[int, Hashable, int, Hashable]]:
    """Each value of ``row`` (paired with itself) and, for ``strength`` 2, each pair of values at two axes."""
    values = list(enumerate(row))
    if strength == 1:
        return {(i, a, i, a) for i, a in values}
    return {(i, a, j, b) for (i, a), (j, b) in itertools.combinations_with_replacement(values, 2)}


def covering_indices(rows: Sequence[Sequence[Hashable]], strength: int = 2) -> List[int]:
    """Indices of a subset of ``rows`` in which every value (``strength`` 1), or every value and every
    pair of values that occurs together in some row (``strength`` 2), occurs in at least one chosen row.

    Greedy: take the row covering the most combinations not yet covered, the first such row on a tie,
    so the sample is the same on every run and every machine. Returns the indices in their original order.
    """
    if strength not in (1, 2):
        raise ValueError(f"strength must be 1 (every value) or 2 (every pair of values), not {strength!r}")
    covers = [_combinations(row, strength) for row in rows]
    uncovered = set().union(*covers)
    chosen: List[int] = []
    while uncovered:
        best = max(range(len(rows)), key=lambda k: (len(covers[k] & uncovered), -k))
        chosen.append(best)
        uncovered -= covers[best]
    return sorted(chosen)


def _mark_outside(params: Sequence, axes: Axes, strength: int) -> List:
    wrapped = [p if isinstance(p, _ParameterSet) else pytest.param(p) for p in params]
    sample = set(covering_indices([tuple(axes(*p.values)) for p in wrapped], strength))
    return [p if k in sample else pytest.param(*p.values, id=p.id, marks=(*p.marks, pytest.mark.slow))
            for k, p in enumerate(wrapped)]


def pairwise(params: Sequence, axes: Axes) -> List:
    """``params`` for ``pytest.mark.parametrize``, the cases outside a pairwise sample marked ``slow``.

    Args:
        params: the full matrix, as ``pytest.param(...)`` objects or plain values.
        axes: called with a case's values (as ``parametrize`` would pass them), returns that case's
            value on each axis, e.g. ``lambda case: (case.level, case.optimizer, case.mode)``.

    Returns:
        The same cases in the same order; those outside the sample carry ``pytest.mark.slow``.
    """
    return _mark_outside(params, axes, strength=2)


def each_value(params: Sequence, axes: Axes) -> List:
    """Like :func:`pairwise`, but the sample only needs every value of every axis once: for matrices
    whose cases are costly (a subprocess or a large model each) and whose axes do not interact."""
    return _mark_outside(params, axes, strength=1)


def in_default_run(param) -> bool:
    """Whether a case returned by :func:`pairwise` runs without ``--full`` (it is not marked ``slow``)."""
    return not any(mark.name == "slow" for mark in param.marks)
