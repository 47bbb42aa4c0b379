"""Planner: how many instances of each stage on which devices, so the bottleneck is as fast as it can be.

Model. A device of kind k hosting the stages S (one process each; they take turns on the device)
serves the requests of the mix at 1 / sum_{s in S} c(s, k, S) requests per second for every stage
in S, where c is the mix-weighted predicted latency (with the memory pressure of S: weights that
do not fit are streamed, see predictor). The capacity of a placement is the minimum over stages
of the summed rates of the devices hosting that stage: the bottleneck. Which S are allowed:

    share="light"  {E}, {T}, {D}, {E,D}: light stages may share a device, the DiT runs alone
    share="any"    every non-empty subset (a single CPU hosting all three stages)
    share="none"   one stage per device

and S must fit the device's memory for every shape of the mix (a single stage may instead stream
its weights, if `streaming`).

Fused (`fused=True`). On alike devices a monolithic deployment (each device running whole
requests) ties or beats every split: no device waits for another, no integer split of devices
over stages. So the planner may also give any device FUSED_COMBO, the fused role: one process
runs each request start to finish on the device. Its rate is the same formula over the three
stages (each stage's latency with the other two co-located, weights that do not fit streamed,
the DiT kept resident first: exactly the monolithic baseline's cost), its memory all weights
together, and it fits where the monolithic baseline runs: resident, or streaming (if
`streaming`) as long as the largest activation fits. It counts for every stage, so a mix of
fused and split devices adds the fused devices' rate to the split path's bottleneck; split
devices beside fused ones that do not host every stage between them are left idle (they could
never finish a request, and add nothing to the bottleneck). With fused
allowed the three-process {E,T,D} (share="any") is dropped: fused has the same modelled compute
and memory, and in the engine no handoffs and no queue slots between the stages, so {E,T,D} could
only tie with it and confuse the tie-breaking. Off by default: a split-only planner is what the
engine used before the fused role existed.

Search. Devices of one kind are interchangeable, so a plan is a count per (kind, combo). Exact:
every composition of each kind's device count over its combos, crossed over kinds, evaluated as
numpy arrays (<= 16 devices: at most 27k plans with two kinds, light sharing). Beyond
`exact_limit` devices, or when the product grows past `max_plans`, a heuristic: the LP relaxation
(devices of a kind split fractionally over its combos, solved by a small simplex) rounded down,
the leftover devices handed out greedily (or rounded by largest remainder, or a pure greedy
start), each improved by a large-neighbourhood search that re-places up to 4 devices of each of two
device kinds at once; the best result wins. Its gap to exact is measured by
tests/unit/scheduler and `dfuse bench simulate` on cases where both run. Ties (within `tie_tolerance`) go to the plan
with the fewest moves from `current`, then to the lowest total utilisation.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping, Sequence

import numpy as np

from .core import FUSED, FUSED_COMBO, STAGES, Demand, Device, Placement, is_fused, stages_of
from .predictor import Predictor

_LIGHT = ("encoder", "decoder")


@dataclass(frozen=True)
class PlannerConfig:
    share: str = "light"
    """Which stages may share a device: "light" (encoder + decoder), "any", or "none"."""
    streaming: bool = True
    """A stage whose weights do not fit a device may run there streaming them (else: not placed)."""
    exact_limit: int = 16
    """Exact search up to this many (unpinned) devices; the heuristic beyond."""
    max_plans: int = 2_000_000
    """Exact search only if the number of candidate plans stays below this."""
    tie_tolerance: float = 1e-9
    """Plans within this relative capacity of the best count as ties (fewest moves wins)."""
    fused: bool = False
    """Every device may also run whole requests in the fused role (FUSED_COMBO; see the module)."""

    def __post_init__(self):
        if not isinstance(self.fused, bool):
            raise ValueError(f"PlannerConfig.fused: must be True or False (got {self.fused!r})")
        if self.share not in ("light", "any", "none"):
            raise ValueError(f"PlannerConfig.share: must be light, any or none (got {self.share!r})")
        if not 0 <= self.tie_tolerance < 1:
            raise ValueError(f"PlannerConfig.tie_tolerance: must be in [0, 1) (got {self.tie_tolerance!r})")


@dataclass(frozen=True)
class Plan:
    placement: Placement
    capacity_rps: float
    """Bottleneck capacity for the demand's mix (requests per second)."""
    stage_capacity: Mapping[str, float]
    moves: int
    """Devices whose stages change relative to `current`."""
    exact: bool


class Planner:
    def __init__(self, config: PlannerConfig | None = None):
        self.config = config or PlannerConfig()

    # 1. The model
    def combos(self, kind: str, demand: Demand, predictor: Predictor) -> list[frozenset]:
        """Stage sets a `kind` device may host for this demand (memory permitting)."""
        shapes = [shape for shape, _ in demand.mix]
        candidates = [frozenset((s,)) for s in STAGES]
        if self.config.share == "light":
            candidates.append(frozenset(_LIGHT))
        elif self.config.share == "any":
            candidates += [frozenset(c) for n in (2, 3) for c in itertools.combinations(STAGES, n)]
        if self.config.fused:  # fused replaces the three-process {E,T,D} it dominates (see the module)
            candidates = [c for c in candidates if len(c) < len(STAGES)] + [FUSED_COMBO]
        return [
            c for c in candidates
            if all(predictor.knows(s, kind) for s in stages_of(c))
            and predictor.fits(c, kind, shapes, self.config.streaming)
        ]

    def rates(self, kind: str, stages: frozenset, demand: Demand, predictor: Predictor) -> np.ndarray:
        """Requests per second one `kind` device hosting `stages` adds to each stage's capacity."""
        if not stages:
            return np.zeros(len(STAGES))
        total = 0.0
        real = stages - {FUSED}  # a fused device runs the same three stages back to back
        for stage in real:
            others = real - {stage}
            total += sum(w * predictor.latency(stage, kind, shape, others) for shape, w in demand.mix)
        return np.array([1.0 / total if s in stages else 0.0 for s in STAGES])

    def capacity(self, placement: Placement, devices: Sequence[Device], demand: Demand,
                 predictor: Predictor) -> tuple[float, dict[str, float]]:
        """(bottleneck requests/s, per-stage requests/s) of `placement` for `demand`'s mix."""
        kinds = {d.id: d.kind for d in devices}
        rate_of = functools.lru_cache(maxsize=None)(lambda kind, stages: tuple(self.rates(kind, stages, demand, predictor)))
        per_stage = np.zeros(len(STAGES))
        for device_id, stages in placement.assignment.items():
            per_stage += rate_of(kinds[device_id], stages)
        return float(per_stage.min()), dict(zip(STAGES, map(float, per_stage)))

    # 2. The search
    def plan(self, devices: Sequence[Device], demand: Demand, predictor: Predictor,
             current: Placement | None = None, pinned: Iterable[str] = ()) -> Plan:
        """The best placement of `devices` for `demand`; `pinned` devices keep their stages in `current`."""
        pinned = set(pinned)
        if pinned and current is None:
            raise ValueError("plan: pinned devices need the current placement")
        free = [d for d in devices if d.id not in pinned]
        kinds = sorted({d.kind for d in free})
        groups = []
        for kind in kinds:
            combos = self.combos(kind, demand, predictor)
            ids = sorted(d.id for d in free if d.kind == kind)
            rates = np.array([self.rates(kind, c, demand, predictor) for c in combos]).reshape(len(combos), len(STAGES))
            now = [sum(1 for i in ids if current is not None and current.assignment.get(i) == c) for c in combos]
            groups.append(_Group(kind, ids, combos, rates, np.array(now, dtype=int)))
        fixed = np.zeros(len(STAGES))
        for device_id in pinned:
            kind = next(d.kind for d in devices if d.id == device_id)
            fixed += self.rates(kind, current.assignment.get(device_id, frozenset()), demand, predictor)

        size = 1
        for g in groups:
            size *= len(_compositions(len(g.ids), len(g.combos)))
        exact = len(free) <= self.config.exact_limit and size <= self.config.max_plans
        counts = self._exact(groups, fixed) if exact else self._heuristic(groups, fixed)

        assignment = {d: current.assignment.get(d, frozenset()) for d in pinned}
        moves = 0
        for g, c in zip(groups, counts):
            part, moved = g.assign(c, current)
            assignment.update(part)
            moves += moved
        if self.config.fused:
            assignment, moves = _whole_split_only(assignment, current, pinned, moves)
        placement = Placement(assignment)
        capacity, per_stage = self.capacity(placement, devices, demand, predictor)
        return Plan(placement, capacity, MappingProxyType(per_stage), moves, exact)

    def _exact(self, groups: list["_Group"], fixed: np.ndarray) -> list[np.ndarray]:
        total, moves = fixed[None, :], np.zeros(1, dtype=int)
        index = np.zeros((1, 0), dtype=int)
        options = []
        for g in groups:
            comps = _compositions(len(g.ids), len(g.combos))
            options.append(comps)
            contrib = comps @ g.rates if len(g.combos) else np.zeros((1, len(STAGES)))
            g_moves = len(g.ids) - np.minimum(comps, g.now).sum(axis=1) if len(g.combos) else np.zeros(1, dtype=int)
            n, m = len(total), len(contrib)
            total = (total[:, None, :] + contrib[None, :, :]).reshape(n * m, -1)
            moves = (moves[:, None] + g_moves[None, :]).reshape(-1)
            index = np.concatenate([np.repeat(index, m, axis=0), np.tile(np.arange(m), n)[:, None]], axis=1)
        best = _choose(total, moves, self.config.tie_tolerance)
        return [options[k][index[best, k]] for k in range(len(groups))]

    def _heuristic(self, groups: list["_Group"], fixed: np.ndarray) -> list[np.ndarray]:
        """Best of two starts, each improved by local search: the LP relaxation rounded down
        (leftover devices handed out greedily), and a pure greedy hand-out."""
        fractional = _lp_relaxation(groups, fixed)
        starts = [_greedy(groups, fixed, [np.floor(x + 1e-9).astype(int) for x in fractional]),
                  [_largest_remainder(x, len(g.ids)) for x, g in zip(fractional, groups)],
                  _greedy(groups, fixed, None)]
        improved = [_local_search(groups, fixed, counts) for counts in starts]
        totals = np.array([fixed + sum(c @ g.rates for c, g in zip(counts, groups) if len(g.combos)) for counts in improved])
        return improved[_leximax(totals)]


def _lp_relaxation(groups: list["_Group"], fixed: np.ndarray) -> list[np.ndarray]:
    """Fractional optimum: max bottleneck with the devices of a kind split freely over its combos.

    max lam  s.t.  lam - sum_{k,c} x_kc r_kcs <= fixed_s (every stage s),  sum_c x_kc <= n_k,  x >= 0
    """
    columns = [(k, j) for k, g in enumerate(groups) for j in range(len(g.combos))]
    n_stages = len(fixed)
    a = np.zeros((n_stages + len(groups), len(columns) + 1))
    b = np.concatenate([fixed, [len(g.ids) for g in groups]]).astype(float)
    a[:n_stages, -1] = 1.0
    for col, (k, j) in enumerate(columns):
        a[:n_stages, col] = -groups[k].rates[j]
        a[n_stages + k, col] = 1.0
    cost = np.zeros(len(columns) + 1)
    cost[-1] = 1.0
    x = _simplex_max(cost, a, b)
    out = [np.zeros(len(g.combos)) for g in groups]
    for col, (k, j) in enumerate(columns):
        out[k][j] = x[col]
    return out


def _largest_remainder(x: np.ndarray, n: int) -> np.ndarray:
    """Round `x` to integers summing to n (Hamilton's method)."""
    if not len(x):
        return np.zeros(0, dtype=int)
    x = x * (n / x.sum()) if x.sum() > 0 else np.full(len(x), n / len(x))
    counts = np.floor(x + 1e-9).astype(int)
    for j in np.argsort(-(x - counts), kind="stable")[: n - counts.sum()]:
        counts[j] += 1
    return counts


def _simplex_max(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """max c.x s.t. a x <= b, x >= 0, for b >= 0: a dense tableau simplex with Bland's rule (tiny LPs)."""
    m, n = a.shape
    t = np.zeros((m + 1, n + m + 1))
    t[:m, :n], t[:m, n:n + m], t[:m, -1], t[m, :n] = a, np.eye(m), b, -c
    basis = list(range(n, n + m))
    for _ in range(50 * (n + m)):
        entering = np.flatnonzero(t[m, :-1] < -1e-12)
        if not entering.size:
            break
        j = int(entering[0])
        column = t[:m, j]
        rows = np.flatnonzero(column > 1e-12)
        if not rows.size:
            raise ValueError("plan: unbounded LP relaxation")
        ratios = t[rows, -1] / column[rows]
        ties = rows[ratios <= ratios.min() + 1e-12]
        i = int(min(ties, key=lambda r: basis[r]))
        t[i] /= t[i, j]
        for r in range(m + 1):
            if r != i and t[r, j] != 0:
                t[r] -= t[r, j] * t[i]
        basis[i] = j
    x = np.zeros(n + m)
    for i, var in enumerate(basis):
        x[var] = t[i, -1]
    return x[:n]


def _greedy(groups: list["_Group"], fixed: np.ndarray, start: list[np.ndarray] | None) -> list[np.ndarray]:
    """Hand out the devices not placed in `start` one at a time, each to the combo that most raises
    the sorted capacity vector; kinds in the order of their best single-device rate."""
    counts = [c.copy() for c in start] if start else [np.zeros(len(g.combos), dtype=int) for g in groups]
    total = fixed + sum(c @ g.rates for c, g in zip(counts, groups) if len(g.combos))
    order = sorted(range(len(groups)), key=lambda k: -groups[k].rates.max() if len(groups[k].combos) else 0)
    for k in order:
        g = groups[k]
        for _ in range(len(g.ids) - int(counts[k].sum())):
            if not len(g.combos):
                break
            candidates = total[None, :] + g.rates
            j = _leximax(candidates)
            counts[k][j] += 1
            total = candidates[j]
    return counts


def _local_search(groups: list["_Group"], fixed: np.ndarray, counts: list[np.ndarray], radius: int = 4,
                  max_rounds: int = 50) -> list[np.ndarray]:
    """Large-neighbourhood search: within any two device kinds at once, re-place up to `radius`
    devices of each; take the step that most raises the sorted capacity vector, until none does."""
    counts = [c.copy() for c in counts]
    total = fixed + sum(c @ g.rates for c, g in zip(counts, groups) if len(g.combos))
    kinds = [k for k, g in enumerate(groups) if len(g.combos) > 1]
    pairs = [(k1, k2) for i, k1 in enumerate(kinds) for k2 in kinds[i + 1:]] or [(k, None) for k in kinds]
    for _ in range(max_rounds):
        best_total, best_step = total, None
        for k1, k2 in pairs:
            d1 = _deltas(len(groups[k1].combos), radius, counts[k1])
            change1 = d1 @ groups[k1].rates
            if k2 is None:
                d2, change2 = np.zeros((1, 0), dtype=int), np.zeros((1, len(total)))
            else:
                d2 = _deltas(len(groups[k2].combos), radius, counts[k2])
                change2 = d2 @ groups[k2].rates
            candidates = (total[None, None, :] + change1[:, None, :] + change2[None, :, :]).reshape(-1, len(total))
            j = _leximax(np.vstack([best_total[None, :], candidates]))
            if j:
                i1, i2 = divmod(j - 1, len(d2))
                best_total, best_step = candidates[j - 1], (k1, d1[i1], k2, d2[i2])
        if best_step is None:
            break
        k1, step1, k2, step2 = best_step
        counts[k1] = counts[k1] + step1
        if k2 is not None:
            counts[k2] = counts[k2] + step2
        total = best_total
    return counts


@functools.lru_cache(maxsize=64)
def _all_deltas(parts: int, radius: int) -> np.ndarray:
    """Integer vectors that move at most `radius` devices between `parts` combos (sum 0)."""
    rows = [d for d in itertools.product(range(-radius, radius + 1), repeat=parts)
            if sum(d) == 0 and sum(x for x in d if x > 0) <= radius]
    return np.array(rows, dtype=int).reshape(-1, parts)


def _deltas(parts: int, radius: int, counts: np.ndarray) -> np.ndarray:
    deltas = _all_deltas(parts, radius)
    return deltas[(deltas + counts[None, :] >= 0).all(axis=1)]


@dataclass
class _Group:
    """The unpinned devices of one kind, the combos they may host and each combo's rates."""

    kind: str
    ids: list[str]
    combos: list[frozenset]
    rates: np.ndarray  # (combos, stages)
    now: np.ndarray  # devices currently hosting each combo

    def assign(self, counts: np.ndarray, current: Placement | None) -> tuple[dict[str, frozenset], int]:
        """Devices for `counts`: those already hosting a combo keep it while it has room."""
        want = {c: int(n) for c, n in zip(self.combos, counts)}
        assignment, rest = {}, []
        for device_id in self.ids:
            stages = current.assignment.get(device_id) if current is not None else None
            if stages is not None and want.get(stages, 0) > 0:
                assignment[device_id] = stages
                want[stages] -= 1
            else:
                rest.append(device_id)
        todo = [c for c in self.combos for _ in range(want[c])]
        for device_id, stages in itertools.zip_longest(rest, todo):
            if device_id is None:
                break
            assignment[device_id] = stages if stages is not None else frozenset()
        moved = sum(1 for d in rest if current is None or current.assignment.get(d) != assignment[d])
        return assignment, moved


@functools.lru_cache(maxsize=256)
def _compositions(n: int, parts: int) -> np.ndarray:
    """Every way to write n as an ordered sum of `parts` non-negative integers (stars and bars)."""
    if parts == 0:
        return np.zeros((1, 0), dtype=int)
    rows = []
    for bars in itertools.combinations(range(n + parts - 1), parts - 1):
        edges = (-1, *bars, n + parts - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(parts)])
    out = np.array(rows, dtype=int).reshape(-1, parts)
    out.setflags(write=False)
    return out


def _whole_split_only(assignment: dict, current: Placement | None, pinned: set, moves: int) -> tuple[dict, int]:
    """Beside fused devices, split devices that do not host every stage between them serve
    nothing: a request sent down that split could never finish. Their rate adds nothing to the
    bottleneck (fused devices add the same rate to every stage), so the search may still pick
    them, for a tie's lower utilisation. They become idle (pinned ones keep their stages);
    `moves` is recounted."""
    split = [d for d, stages in assignment.items() if stages and not is_fused(stages)]
    if set().union(*(assignment[d] for d in split)) >= set(STAGES):
        return assignment, moves
    assignment = {d: frozenset() if d in split and d not in pinned else stages for d, stages in assignment.items()}
    before = current.assignment if current is not None else {}
    return assignment, sum(1 for d, stages in assignment.items() if d not in pinned and before.get(d, frozenset()) != stages)


def _choose(total: np.ndarray, moves: np.ndarray, tolerance: float) -> int:
    """Index of the best plan: max bottleneck; ties -> fewest moves -> lowest total utilisation."""
    capacity = total.min(axis=1)
    best = capacity.max()
    if best <= 0:
        raise ValueError("plan: no placement serves every stage (a stage fits on no device?)")
    tied = np.flatnonzero(capacity >= best * (1 - tolerance) - 1e-12)
    fewest = tied[moves[tied] == moves[tied].min()]
    load = (1.0 / total[fewest]).sum(axis=1)
    return int(fewest[np.argmin(load)])


def _leximax(candidates: np.ndarray) -> int:
    """Index of the row whose ascending-sorted values are lexicographically largest (first on ties)."""
    ordered = np.round(np.sort(candidates, axis=1), 12)
    keys = (-np.arange(len(ordered)),) + tuple(ordered[:, j] for j in reversed(range(ordered.shape[1])))
    return int(np.lexsort(keys)[-1])


def brute_force(planner: Planner, devices: Sequence[Device], demand: Demand, predictor: Predictor) -> float:
    """Best bottleneck capacity over every device -> combo assignment (for tests on tiny clusters)."""
    options = {d.id: planner.combos(d.kind, demand, predictor) or [frozenset()] for d in devices}
    best = 0.0
    for choice in itertools.product(*(options[d.id] for d in devices)):
        placement = Placement({d.id: c for d, c in zip(devices, choice)})
        best = max(best, planner.capacity(placement, devices, demand, predictor)[0])
    return best
