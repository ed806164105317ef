"""Job dependencies: cycles refused with their path, downstream order, and the drawn layout."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.domain.errors import InvalidInput
from kiln.scheduling.jobgraph import check_new_edge, dependents, downstream, layout

NAMES = {1: "ingest", 2: "clean", 3: "train", 4: "features", 5: "report", 6: "adhoc"}
# clean and features run after ingest; train after clean; report after train and features.
EDGES = [(2, 1), (3, 2), (4, 1), (5, 3), (5, 4)]


def test_a_job_cannot_depend_on_itself() -> None:
    with pytest.raises(InvalidInput) as caught:
        check_new_edge(EDGES, 3, 3, NAMES)
    assert caught.value.detail == "job 'train' cannot depend on itself"
    assert caught.value.status == 422


def test_a_two_job_cycle_is_named() -> None:
    with pytest.raises(InvalidInput) as caught:
        check_new_edge([(2, 1)], 1, 2, NAMES)
    assert caught.value.detail == (
        "job 'ingest' cannot depend on 'clean', because that makes a cycle: "
        "'ingest' would run after 'clean', which runs after 'ingest'"
    )


def test_a_longer_cycle_is_named_by_its_shortest_path() -> None:
    # ingest -> report closes two cycles; the message shows the shorter, via features.
    with pytest.raises(InvalidInput) as caught:
        check_new_edge(EDGES, 1, 5, NAMES)
    assert caught.value.detail.endswith(
        "'ingest' would run after 'report', which runs after 'features', which runs after 'ingest'"
    )


def test_without_names_ids_are_shown() -> None:
    with pytest.raises(InvalidInput, match="job 1 cannot depend on 3, because"):
        check_new_edge(EDGES, 1, 3)
    with pytest.raises(InvalidInput, match="job 'a' cannot depend on itself"):
        check_new_edge([], "a", "a")


def test_a_very_long_cycle_is_shortened_in_the_message() -> None:
    chain = [(i + 1, i) for i in range(1, 40)]  # 40 runs after 39 ... 2 after 1
    with pytest.raises(InvalidInput) as caught:
        check_new_edge(chain, 1, 40)
    assert ", which runs after ..., which runs after 1" in caught.value.detail
    assert len(caught.value.detail) < 400


def test_acyclic_additions_are_accepted() -> None:
    check_new_edge(EDGES, 5, 1, NAMES)  # a shortcut edge in the same direction
    check_new_edge(EDGES, 5, 2, NAMES)
    check_new_edge(EDGES, 6, 5, NAMES)  # a new leaf
    check_new_edge(EDGES, 3, 2, NAMES)  # an edge that exists already
    check_new_edge([], 1, 2)


def test_dependents_and_downstream() -> None:
    assert dependents(EDGES, 1) == [2, 4]
    assert dependents(EDGES, 5) == []
    # Each job after all its parents; report last, though features is nearer to ingest.
    assert downstream(EDGES, 1, NAMES) == [2, 4, 3, 5]
    assert downstream(EDGES, 2) == [3, 5]
    assert downstream(EDGES, 6) == []


def test_layout_columns_rows_and_edges() -> None:
    result = layout(NAMES, EDGES, NAMES)
    assert result.layers == [[6, 1], [2, 4], [3], [5]]  # adhoc < ingest by name
    assert result.cyclic == []
    where = {n.job: (n.layer, n.row) for n in result.nodes}
    assert where == {6: (0, 0), 1: (0, 1), 2: (1, 0), 4: (1, 1), 3: (2, 0), 5: (3, 0)}
    spans = {(e.parent, e.child): e.span for e in result.edges}
    assert spans == {(1, 2): 1, (1, 4): 1, (2, 3): 1, (3, 5): 1, (4, 5): 2}
    data = result.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["nodes"][0] == {"job": 6, "layer": 0, "row": 0}


def test_layout_orders_rows_by_their_parents_to_avoid_crossings() -> None:
    # Two independent pipelines a->b and c->d; names chosen so name order alone would cross.
    edges = [("b", "a"), ("d", "c")]
    names = {"a": "1", "b": "2-z", "c": "3", "d": "2-a"}
    result = layout(["a", "b", "c", "d"], edges, names)
    assert result.layers == [["a", "c"], ["b", "d"]]


def test_layout_is_independent_of_input_order() -> None:
    a = layout([1, 2, 3, 4, 5, 6], EDGES)
    b = layout([6, 5, 4, 3, 2, 1], list(reversed(EDGES)))
    assert a == b


def test_layout_of_a_corrupted_cyclic_graph_still_renders() -> None:
    result = layout([1, 2, 3, 4], [(2, 1), (3, 2), (2, 3)])
    assert result.cyclic == [2, 3]
    assert result.layers == [[1, 4], [2, 3]]
    assert len(result.nodes) == 4


def test_layout_refuses_edges_to_unknown_jobs() -> None:
    with pytest.raises(ValueError, match="names a job not in the layout"):
        layout([1, 2], [(3, 1)])


def test_empty_project() -> None:
    assert layout([], []).to_dict() == {"nodes": [], "edges": [], "layers": [], "cyclic": []}


# -- Against brute force, on random DAGs ----------------------------------------------------


@st.composite
def dags(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]]]:
    n = draw(st.integers(1, 12))
    pairs = [(c, p) for c in range(n) for p in range(c)]  # child > parent: acyclic
    edges = draw(st.lists(st.sampled_from(pairs), unique=True)) if pairs else []
    perm = draw(st.permutations(range(n)))  # hide the ordering
    return n, [(perm[c], perm[p]) for c, p in edges]


def _reaches(edges: list[tuple[int, int]], start: int, goal: int) -> bool:
    """Does ``start`` (transitively) run after ``goal``?"""
    stack, seen = [start], set()
    while stack:
        job = stack.pop()
        if job == goal:
            return True
        seen.add(job)
        stack.extend(p for c, p in edges if c == job and p not in seen)
    return False


@settings(max_examples=200, deadline=None, database=None)
@given(dag=dags(), data=st.data())
def test_check_new_edge_refuses_exactly_the_edges_that_close_a_cycle(
    dag: tuple[int, list[tuple[int, int]]], data: st.DataObject
) -> None:
    n, edges = dag
    child = data.draw(st.integers(0, n - 1))
    parent = data.draw(st.integers(0, n - 1))
    closes_cycle = child == parent or _reaches(edges, parent, child)
    try:
        check_new_edge(edges, child, parent)
    except InvalidInput as error:
        assert closes_cycle
        assert repr(child) in error.detail and repr(parent) in error.detail
    else:
        assert not closes_cycle


@settings(max_examples=200, deadline=None, database=None)
@given(dag=dags())
def test_layout_puts_every_job_one_column_after_its_deepest_parent(
    dag: tuple[int, list[tuple[int, int]]],
) -> None:
    n, edges = dag
    result = layout(range(n), edges)
    layer = {node.job: node.layer for node in result.nodes}
    assert sorted(layer) == list(range(n))
    for job in range(n):
        parents = [p for c, p in edges if c == job]
        assert layer[job] == (1 + max(layer[p] for p in parents) if parents else 0)
    assert all(e.span >= 1 for e in result.edges)
    rows = [(node.layer, node.row) for node in result.nodes]
    assert len(set(rows)) == n
    for job in range(n):
        below = downstream(edges, job)
        assert set(below) == {j for j in range(n) if j != job and _reaches(edges, j, job)}
        position = {j: i for i, j in enumerate(below)}
        for c, p in edges:
            if c in position and p in position:
                assert position[p] < position[c]
