"""The hindsight oracle: per window, the clock that uses the least energy within the SLO.

For each window of `window_s` the oracle clones the node and re-simulates the window from the
same state at every candidate clock cap (one cap for every GPU: the groups are statistically
alike and the dispatcher balances them), over the window plus a `tail_s` look-ahead at the
same clock, so a candidate that leaves a backlog pays for it in energy and in late requests.
The candidates are a coarse grid from `low_fraction`·f_max to f_max, then finer grids around
the best until its evaluated neighbours are the clock table's next steps. The chosen
candidate's clone becomes the run, so the committed trajectory is exactly the one evaluated.

Misses are counted when they become certain, not only when a request finishes: a request
misses as soon as its TTFT exceeds the TTFT SLO (its first token came late, or it has none at
an age past the SLO), or at its finish for a late mean inter-token latency. So a candidate
that leaves requests waiting past the SLO at the end of its look-ahead pays for them there,
and a slow clock cannot look cheap by finishing fewer (late) requests: unfinished work is not
free. A candidate's misses are those that became certain between the window's start and the
end of its look-ahead. The end-of-run accounting of every policy uses the same rule (see
measure.py), so the work the oracle leaves at the very end is judged as anyone's.

The SLO is a budget over the whole run, not a rule per window: a per-window rule would forbid
the oracle the misses a controller may spend where they save most, and so make the "limit"
beatable. The budget is measured against the default run itself (re-simulated once up front
from the same start: unlocked clocks, default limit): by any time t the oracle may have missed
at most default's misses certain by t plus `slack` × default's finished requests so far. A
candidate is admissible when its misses over the look-ahead, beyond default's over the same
stretch, fit the budget left plus that stretch's slack; the budget left counts the oracle's
own misses exactly, so an over-spend is paid back in later windows. Among admissible
candidates the oracle takes the least energy + price × misses beyond default's, the price
being `miss_price` × default's energy per finished request, so a miss is spent only where it
saves a sizeable share of a request's energy. With `slack` below the benchmark's 0.5-point
tolerance the oracle's attainment stays within that tolerance of default's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from powerd.bench import measure
from powerd.bench.measure import Recorder
from powerd.bench.options import OracleOptions
from powerd.bench.policies import coarse_grid_mhz, refine_around
from powerd.config import SloConfig
from powerd.sim.node import SimNode


@dataclass(frozen=True, slots=True)
class Reference:
    """Default's run: when each request finished, and when each miss became certain."""

    finish_s: np.ndarray
    """Sorted completion times."""
    miss_s: np.ndarray
    """Sorted times at which each miss became certain (see the module docstring)."""
    energy_per_request_j: float

    def counts(self, t0_s: float, t1_s: float) -> tuple[int, int]:
        """(requests finished, misses become certain) in (t0_s, t1_s]."""
        f0, f1 = np.searchsorted(self.finish_s, [t0_s, t1_s], side="right")
        m0, m1 = np.searchsorted(self.miss_s, [t0_s, t1_s], side="right")
        return int(f1 - f0), int(m1 - m0)


def reference_run(node: SimNode, duration_s: float, slo: SloConfig, interval_s: float) -> Reference:
    """Drive `node` (a copy of the start) uncontrolled to duration_s and index its requests."""
    measure.drive(node, duration_s, interval_s)
    records = node.finished_records()
    arrival = np.asarray(records["arrival_s"], dtype=np.float64)
    ttft = np.asarray(records["ttft_s"], dtype=np.float64)
    finish = arrival + np.asarray(records["e2e_s"], dtype=np.float64)
    met = measure.slo_met(ttft, np.asarray(records["itl_mean_s"], dtype=np.float64), slo)
    # A late first token makes the miss certain once the request's age passes the TTFT SLO;
    # a late mean inter-token latency only at its finish.
    late_first = ttft > slo.ttft_s
    known = np.where(late_first, arrival + slo.ttft_s, finish)[~met]
    open_arrival, open_ttft = measure.unfinished_ttft_s(node)
    known = np.concatenate([known, open_arrival[open_ttft > slo.ttft_s] + slo.ttft_s])
    return Reference(np.sort(finish), np.sort(known), measure.energy_j(node) / max(len(finish), 1))


@dataclass(slots=True)
class _Candidate:
    clock_mhz: int
    energy_j: float
    """Over the window and its look-ahead."""
    misses: int
    """Become certain over the window and its look-ahead."""
    window_misses: int
    """Become certain over the window alone (what committing it costs)."""
    state: SimNode
    """The clone at the end of the window (not the look-ahead)."""
    recorder: Recorder


class Oracle:
    """Runs a node to the end in hindsight-optimal windows (see the module docstring)."""

    name = "oracle"

    def __init__(
        self, slo: SloConfig, interval_s: float = 1.0, options: OracleOptions | None = None
    ) -> None:
        self.slo = slo
        self.interval_s = interval_s
        self.options = options or OracleOptions()
        self.chosen: list[tuple[float, int]] = []
        """(window start s, clock MHz) per window."""
        self.misses = 0
        """The committed run's misses certain so far."""
        self.evaluations = 0

    def run(self, node: SimNode, duration_s: float) -> tuple[SimNode, Recorder]:
        """The node driven to duration_s, and the recorder of the committed trajectory."""
        opts = self.options
        reference = reference_run(node.clone(), duration_s, self.slo, self.interval_s)
        profile = node.plant.profile
        table = [int(c) for c in measure.clock_table_mhz(node)]
        f_max = int(profile.sm_clock_max_mhz)
        low = max(profile.sm_clock_min_mhz, opts.low_fraction * f_max)
        grid = coarse_grid_mhz(table, low, f_max, opts.coarse)
        recorder = Recorder(node)
        while node.now_s < duration_s - 1e-9:
            start = node.now_s
            end = min(start + opts.window_s, duration_s)
            horizon = min(end + opts.tail_s, duration_s)
            late = measure.late_unfinished(node, self.slo)
            candidates = {c: self._evaluate(node, c, end, horizon, late) for c in grid}
            best = self.choose(candidates, reference, start, horizon)
            # Down to the table's own step: the best and its evaluated neighbours adjacent.
            while finer := refine_around(
                table, sorted(candidates), best.clock_mhz, opts.refine_per_side
            ):
                for clock in finer:
                    candidates[clock] = self._evaluate(node, clock, end, horizon, late)
                best = self.choose(candidates, reference, start, horizon)
            self.misses += best.window_misses
            self.chosen.append((start, best.clock_mhz))
            recorder.extend(best.recorder)
            node = best.state
        return node, recorder

    def _new_misses(self, node: SimNode, n0: int, late0: int) -> int:
        """Misses become certain since the node had n0 finished and late0 late unfinished:
        the finished misses since, plus the late unfinished now, less those late before
        (each of which has since finished as a miss or is still late)."""
        ttft, itl = measure.latencies(node, n0)
        finished_misses = int(len(ttft) - measure.slo_met(ttft, itl, self.slo).sum())
        return finished_misses + measure.late_unfinished(node, self.slo) - late0

    def _evaluate(
        self, node: SimNode, clock_mhz: int, end_s: float, horizon_s: float, late0: int
    ) -> _Candidate:
        self.evaluations += 1
        trial = node.clone()
        measure.set_clock_cap(trial, clock_mhz)
        e0 = measure.energy_j(trial)
        n0 = measure.finished_count(trial)
        recorder = Recorder(trial)
        measure.drive(trial, end_s, self.interval_s, recorder=recorder)
        window_misses = self._new_misses(trial, n0, late0)
        misses = window_misses
        look = trial
        if horizon_s > end_s + 1e-9:
            look = trial.clone()
            look.advance(horizon_s - end_s)
            misses = self._new_misses(look, n0, late0)
        return _Candidate(
            clock_mhz=clock_mhz,
            energy_j=measure.energy_j(look) - e0,
            misses=misses,
            window_misses=window_misses,
            state=trial,
            recorder=recorder,
        )

    def budget(self, reference: Reference, now_s: float) -> float:
        """Misses the run may still spend at now_s beyond default's (negative: over-spent)."""
        finished, missed = reference.counts(-1.0, now_s)
        return missed + self.options.slack * finished - self.misses

    def choose(
        self,
        candidates: dict[int, _Candidate],
        reference: Reference,
        start_s: float,
        horizon_s: float,
    ) -> _Candidate:
        """The admissible candidate with the least priced energy (see the module docstring);
        the one with the fewest misses when none is admissible."""
        opts = self.options
        ref_finished, ref_missed = reference.counts(start_s, horizon_s)
        available = self.budget(reference, start_s) + opts.slack * ref_finished
        price = opts.miss_price * reference.energy_per_request_j

        def extra(c: _Candidate) -> int:
            return c.misses - ref_missed

        admissible = [c for c in candidates.values() if extra(c) <= available]
        if not admissible:
            return min(candidates.values(), key=lambda c: (c.misses, -c.clock_mhz))
        return min(
            admissible,
            key=lambda c: (c.energy_j + price * max(extra(c), 0), -c.clock_mhz),
        )

    def notes(self) -> str:
        if not self.chosen:
            return ""
        clocks = [c for _, c in self.chosen]
        return (
            f"{self.options.window_s:.0f}-s windows, slack {100 * self.options.slack:.1f} % of "
            f"requests, clocks {min(clocks)}-{max(clocks)} MHz, "
            f"mean {sum(clocks) / len(clocks):.0f}"
        )
