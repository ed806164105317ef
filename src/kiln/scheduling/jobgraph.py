"""Job dependencies: a child job runs after its parent job succeeds.

Edges are ``(child, parent)`` pairs of job ids (ints or strings), the way a ``job_dependencies``
table would hold them. Everything here is pure and deterministic (ties are broken by the
job's name, then its id) so the same graph always draws the same way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from kiln.domain.errors import InvalidInput

K = TypeVar("K", int, str)

MAX_CYCLE_NAMES = 12  # a longer cycle is shortened in the message


def _parents_of(edges: Iterable[tuple[K, K]]) -> dict[K, set[K]]:
    parents: dict[K, set[K]] = {}
    for child, parent in edges:
        parents.setdefault(child, set()).add(parent)
    return parents


def _children_of(edges: Iterable[tuple[K, K]]) -> dict[K, set[K]]:
    children: dict[K, set[K]] = {}
    for child, parent in edges:
        children.setdefault(parent, set()).add(child)
    return children


def _label(job: K, names: Mapping[K, str] | None) -> str:
    return repr(names[job]) if names and job in names else repr(job)


def _sort_key(names: Mapping[K, str] | None) -> Any:
    def key(job: K) -> tuple[str, K]:
        return (names.get(job, "") if names else "", job)

    return key


def check_new_edge(
    edges: Iterable[tuple[K, K]], child: K, parent: K, names: Mapping[K, str] | None = None
) -> None:
    """Refuse to make ``child`` depend on ``parent`` when that forms a cycle.

    ``InvalidInput`` (422) for a self-dependency, or for a parent that already runs after the
    child; the message names the cycle, shortest first: "'a' runs after 'b', which runs after
    'a'". An edge that already exists is fine (adding it again changes nothing).
    """
    if child == parent:
        raise InvalidInput(f"job {_label(child, names)} cannot depend on itself")
    parents = _parents_of(edges)
    # Breadth-first from the parent along "runs after" links; reaching the child is a cycle.
    came_from: dict[K, K] = {}
    queue: deque[K] = deque([parent])
    seen = {parent}
    key = _sort_key(names)
    while queue:
        job = queue.popleft()
        if job == child:
            chain: list[K] = [child]
            while chain[-1] != parent:
                chain.append(came_from[chain[-1]])
            chain.reverse()
            chain.insert(0, child)  # child, parent, ..., child: the cycle the edge would close
            labels = [_label(job, names) for job in chain]
            raise InvalidInput(
                f"job {_label(child, names)} cannot depend on {_label(parent, names)}, "
                f"because that makes a cycle: {_describe_cycle(labels)}"
            )
        for upstream in sorted(parents.get(job, ()), key=key):
            if upstream not in seen:
                seen.add(upstream)
                came_from[upstream] = job
                queue.append(upstream)


def _describe_cycle(labels: list[str]) -> str:
    if len(labels) > MAX_CYCLE_NAMES:
        labels = [*labels[: MAX_CYCLE_NAMES - 2], "...", labels[-1]]
    first, second, *rest = labels
    return f"{first} would run after {second}" + "".join(f", which runs after {x}" for x in rest)


def dependents(edges: Iterable[tuple[K, K]], job: K) -> list[K]:
    """The jobs that run directly after ``job`` succeeds (trigger these), sorted by id."""
    return sorted(_children_of(edges).get(job, ()))


def downstream(
    edges: Iterable[tuple[K, K]], job: K, names: Mapping[K, str] | None = None
) -> list[K]:
    """Every job that (transitively) runs after ``job``, each after all of its own parents.

    What a user should be told before deleting or disabling ``job``.
    """
    edge_list = list(edges)
    children = _children_of(edge_list)
    reached: set[K] = set()
    stack = [job]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in reached and child != job:
                reached.add(child)
                stack.append(child)
    sub_edges = [(c, p) for c, p in edge_list if c in reached and p in reached]
    return [j for layer in _layers(reached, sub_edges, names)[0] for j in layer]


@dataclass(frozen=True)
class LayoutNode(Generic[K]):
    job: K
    layer: int  # column: 0 for jobs without parents, else 1 + the deepest parent's layer
    row: int  # position within the column, from the top


@dataclass(frozen=True)
class LayoutEdge(Generic[K]):
    parent: K
    child: K
    span: int  # layers crossed; more than 1 means the edge passes other columns


@dataclass(frozen=True)
class GraphLayout(Generic[K]):
    """A project's pipeline, ready to draw: columns of jobs and the edges between them."""

    nodes: list[LayoutNode[K]]
    edges: list[LayoutEdge[K]]
    layers: list[list[K]]
    # Jobs on a cycle (a corrupted graph): drawn in one last column so the page still renders.
    cyclic: list[K] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [{"job": n.job, "layer": n.layer, "row": n.row} for n in self.nodes],
            "edges": [{"parent": e.parent, "child": e.child, "span": e.span} for e in self.edges],
            "layers": [list(layer) for layer in self.layers],
            "cyclic": list(self.cyclic),
        }


def _layers(
    jobs: Iterable[K], edges: list[tuple[K, K]], names: Mapping[K, str] | None
) -> tuple[list[list[K]], list[K]]:
    """Longest-path layering (Kahn's algorithm), rows ordered by the parents' mean row.

    Returns the layers and the jobs left over because they sit on a cycle.
    """
    key = _sort_key(names)
    parents, children = _parents_of(edges), _children_of(edges)
    waiting = {job: len(parents.get(job, ())) for job in jobs}
    depth = dict.fromkeys(waiting, 0)
    frontier = sorted((j for j, n in waiting.items() if n == 0), key=key)
    order: list[K] = []
    while frontier:
        ready: list[K] = []
        for job in frontier:
            order.append(job)
            for child in children.get(job, ()):
                depth[child] = max(depth[child], depth[job] + 1)
                waiting[child] -= 1
                if waiting[child] == 0:
                    ready.append(child)
        frontier = sorted(ready, key=key)
    layers: list[list[K]] = [[] for _ in range(max((depth[j] for j in order), default=-1) + 1)]
    row: dict[K, int] = {}

    def barycenter(job: K) -> float:  # mean row of the parents already placed
        placed = [row[p] for p in parents.get(job, ()) if p in row]
        return sum(placed) / len(placed) if placed else 0.0

    for number, members in enumerate(layers):
        candidates = [j for j in order if depth[j] == number]
        members.extend(sorted(candidates, key=lambda j: (barycenter(j), key(j))))
        row.update((job, i) for i, job in enumerate(members))
    leftover = sorted((j for j in waiting if j not in row), key=key)
    return layers, leftover


def layout(
    jobs: Iterable[K], edges: Iterable[tuple[K, K]], names: Mapping[K, str] | None = None
) -> GraphLayout[K]:
    """Lay out a project's jobs as columns by dependency depth, for the pipeline view.

    Every job in ``jobs`` appears once, including jobs with no dependencies (column 0). An
    edge naming a job not in ``jobs`` is a caller bug: ``ValueError``.
    """
    job_list = list(dict.fromkeys(jobs))
    known = set(job_list)
    edge_list = sorted(set(edges))
    for child, parent in edge_list:
        if child not in known or parent not in known:
            raise ValueError(f"edge {child!r} -> {parent!r} names a job not in the layout")
    layers, cyclic = _layers(job_list, edge_list, names)
    if cyclic:
        layers.append(cyclic)
    where = {
        job: (number, i) for number, members in enumerate(layers) for i, job in enumerate(members)
    }
    nodes = [LayoutNode(job, *where[job]) for members in layers for job in members]
    drawn = [
        LayoutEdge(parent, child, where[child][0] - where[parent][0]) for child, parent in edge_list
    ]
    drawn.sort(key=lambda e: (where[e.parent], where[e.child]))
    return GraphLayout(nodes=nodes, edges=drawn, layers=layers, cyclic=cyclic)
