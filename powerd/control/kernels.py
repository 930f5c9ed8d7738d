"""numba-compiled array kernels: the only module that imports numba.

Kernels are pure functions over arrays (no globals, no I/O) compiled with cache=True. Other
layers that need compiled loops (the simulator) use `jit` from here.

The controller (controller_step) per group and tick:
- estimates requests' mean inter-token latency by Little's law (running / tokens per second,
  averaged over a request's life), falling back to the server's ITL quantile;
- learns online, per demand bin, the latency-vs-clock roofline knee (from cells of latency per
  clock bin), a power model quadratic in the clock at fixed demand (energy per token vs clock),
  the prefill capacity per MHz (over runs of ticks where a server counts a whole prompt at its
  first token, as vLLM does; where the server times its prefill passes, as TGI does, prompt
  tokens over clock x seconds of prefill over minutes), prompt tokens per request, the slowest
  recent first token (as TTFT x clock) and the clocks recently blamed for SLO misses;
- raises at once on a latency past the margin line (sized by the roofline), a miss (at least
  halfway to f_max), a full or growing queue, a queue whose prompts would take past 0.35 of
  the TTFT SLO to prefill or a late first token (both to the clock that serves them in time:
  prefill time scales as 1/f), a KV cache at 0.9 or more full (in proportion: a lower clock
  keeps more requests running at once) or a preemption (to f_max), or a one-tick quantile
  spike (one step); holds for a few seconds;
- boosts one tick's cap, without moving the chosen clock, while requests wait and the prompt
  rate nears the learned prefill capacity (a prompt burst: queueing scales as 1/f), where the
  server counts prompt tokens chunk by chunk;
- lowers only with slack, by three clock steps a second (after a raise, a quarter of the way
  back to the clock before it a second; never more than max_step_down a tick), never below
  the floor, the latency bound, the clock the slowest recent first token needs, the
  prefill-headroom bound (prefill as a first-come queue: the capacity at which a new request's
  mean wait, from the prompt load and the server's prompt-length mix, is 0.1 of the TTFT SLO;
  where prompts are counted whole, once 4 s of capacity samples or 5 s of timed prefill are
  in), the learned safe clock (above recent misses, late first tokens included) or the energy
  optimum;
- dithers by dither_mhz when settled, clamps to supported clocks, applies the mode (target,
  budget, off) and returns to defaults at once when the observation is stale.

Time constants are in seconds, not ticks: the daemon's tick (interval_s) may be 0.1 to 10 s, and
each tick's OBS_INTERVAL_S converts them (a smoothing factor a per second becomes
1 - (1 - a)^interval_s, a decay d per second d^interval_s), so that the controller follows the
same time course at any tick. At a 1-s tick every conversion is exact: the decisions are those
of a controller that counts ticks.

The controller works on a structure of arrays over G groups. Row constants below name the rows
of each array; NaN marks a value the sensors or the server did not give.

- obs[N_OBS, G]: one tick's observation per group.
- params[N_PAR, G]: device and SLO constraints per group.
- clocks[G, K]: supported SM clocks per group, ascending, padded with NaN; n_clocks[G] counts them.
- knobs[N_KNOB]: mode and tuning shared by all groups.
- state[N_ST, G]: per-group controller state (zeros before the first tick).
- efit[G, N_EFIT]: exponentially weighted normal equations of the power model
  P = b0 + b1*gen_tps + b2*prompt_tps + b3*x + b4*x^2 (per GPU, x the clock below f_max),
  fitted with forgetting: at fixed demand, power vs clock is energy per token vs clock.
- cells[G, L, C, N_CELL]: per group x demand bin x clock bin, weighted sums of the requests'
  inter-token latency (the learned latency-vs-clock map).
- misses[G, L, N_MISS]: per group and demand bin, the recent SLO misses and the highest clock
  blamed for them (the learned safe clock).
- out[N_OUT, G]: the decision (clock cap, power limit or NaN for the default, reason code, target
  reached as 0/1 or NaN).
- tick[N_TK]: scratch for one group's tick, shared by the stages of the step.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable
from typing import Any, TypeVar

import llvmlite.binding
import numba
import numpy as np

from powerd.control.numba_cache import cache_dir, holds_kernels, prune_stale

# Before the first kernel: numba takes the cache folder as each is decorated.
CACHE_DIR = cache_dir()
CACHE_STAMP = (
    f"numba {numba.__version__}; Python {platform.python_version()}; "
    f"CPU {llvmlite.binding.get_host_cpu_name()}"
)
"""What compiles the kernels: a cache another of these filled is compiled into again."""
CACHE_WARM = holds_kernels(CACHE_DIR, CACHE_STAMP)
"""False when this version's kernels are still to be compiled (the first start: up to a
minute on a small machine)."""
prune_stale(CACHE_DIR)
numba.config.CACHE_DIR = str(CACHE_DIR)  # type: ignore[attr-defined]
JIT_ENABLED = not numba.config.DISABLE_JIT  # type: ignore[attr-defined]
"""False under NUMBA_DISABLE_JIT=1: the kernels run as Python and nothing is compiled."""

F = TypeVar("F", bound=Callable[..., Any])


def jit(func: F) -> F:
    """Compile a pure numerical function with numba (nopython, cached on disk)."""
    return numba.njit(cache=True, nogil=True)(func)  # type: ignore[return-value]


def _inline_jit(func: F) -> F:
    """`jit` for a stage of a kernel: numba inlines it into each jitted caller. The stages of
    _group_step are functions for the reader: called, some twenty a group with their arrays
    passed part by part, they made controller_step a quarter slower."""
    return numba.njit(cache=True, nogil=True, inline="always")(func)  # type: ignore[return-value]


# Observation rows.
OBS_INTERVAL_S = 0
OBS_GPU_COUNT = 1
OBS_ENERGY_J = 2
OBS_POWER_W = 3
OBS_GEN_TPS = 4
OBS_PROMPT_TPS = 5
OBS_RUNNING = 6
OBS_WAITING = 7
OBS_TTFT_Q_S = 8
"""TTFT at the SLO's quantile (`slo.quantile`, p95 by default) over the tick."""
OBS_ITL_Q_S = 9
"""Inter-token latency at the SLO's quantile over the tick."""
OBS_SM_CLOCK_MHZ = 10
OBS_REASONS = 11
OBS_STALE = 12
OBS_REALTIME = 13
OBS_TTFT_SLOWEST_S = 14
OBS_FINISHED_RPS = 15
OBS_PROMPT_WEIGHTED_TOKENS = 16
OBS_INTERVAL_CAP_MHZ = 17
OBS_PROMPT_PER_CHUNK = 18
OBS_KV_USAGE = 19
OBS_PREEMPTIONS = 20
OBS_FIRST_TOKEN_BLIND = 21
OBS_PREFILL_BUSY_S = 22
OBS_LOWERED_CAP = 23
OBS_LIMITED_GPUS = 24
N_OBS = 25

# Parameter rows.
PAR_CLOCK_MAX_MHZ = 0
PAR_FLOOR_MHZ = 1
PAR_ITL_SLO_S = 2
PAR_TTFT_SLO_S = 3
PAR_MAX_WAITING = 4
PAR_PL_MIN_MW = 5
PAR_PL_MAX_MW = 6
PAR_PL_DEFAULT_MW = 7
PAR_BLIND_MIN_MHZ = 8
N_PAR = 9

# Knob indices.
KNOB_MODE = 0
KNOB_SLO_MARGIN = 1
KNOB_STEP_DOWN_MHZ = 2
KNOB_DITHER_MHZ = 3
KNOB_TARGET_TPJ = 4
KNOB_BUDGET_W = 5
KNOB_TRACK_LIMIT = 6
KNOB_INTERVAL_S = 7
"""The configured tick, for a tick whose observation gives no interval (NaN: 1 s)."""
N_KNOB = 8

MODE_EFFICIENCY = 0
MODE_TARGET = 1
MODE_BUDGET = 2
MODE_OFF = 3

_CLOCK_HISTORY_BUCKETS = 3
"""Whole seconds of clock history kept before the current one: requests' ITL averages over about
the current interval and these three seconds."""
_PREFILL_BUCKETS = 3
"""Seconds of a prefill run kept: the current one and the two before it."""

# State rows.
ST_READY = 0
ST_BASE_MHZ = 1
"""The chosen clock cap before the dither."""
ST_CAP_MHZ = 2
"""The cap last emitted."""
ST_LIMIT_MW = 3
ST_HOLD_S = 4
"""Seconds left during which the cap is not lowered (hysteresis after a raise)."""
ST_SETTLED_S = 5
"""Seconds since the base last moved."""
ST_DEMAND_TPS = 6
ST_PROMPT_TPS = 7
ST_ITL_S = 8
ST_TTFT_S = 9
ST_WAITING = 10
ST_TOKENS_EW = 11
ST_ENERGY_EW = 12
ST_TPJ = 13
ST_TARGET_MHZ = 14
ST_POWER_W = 15
"""Per-GPU power, smoothed."""
ST_POWER_PEAK_W = 16
ST_KAPPA = 17
"""Learned knee of the latency roofline as a share of f_max."""
ST_SLOPE_W_PER_MHZ = 18
"""Learned d(power per GPU)/d(clock) at fixed demand."""
ST_SLOPE_T = 19
"""t-statistic of that slope."""
ST_SLO_MIN_MHZ = 20
"""Predicted lowest clock meeting the latency SLO with margin."""
ST_LOAD_BIN = 21
ST_PRESSURE = 22
"""1 when a guard raised the group's clock this tick (latency, a late first token, the queue,
the KV cache, a preemption or a one-tick spike; at f_max a raise that has no room counts too),
a hold after a raise lasts, or the observation is stale; else 0. A prefill burst's one-tick
boost does not set it."""
ST_ENERGY_OPT_MHZ = 23
"""Clock of least power at the current demand from the learned power model (NaN: none)."""
ST_QUEUE_TREND = 24
"""Smoothed change of the waiting count per second."""
ST_SAFE_MHZ = 25
"""Lowest clock above every recent SLO miss at the current demand (-inf: none)."""
ST_RUNNING_EW = 26
ST_GEN_EW = 27
ST_ITL_EST_S = 28
"""Per-request mean inter-token latency estimated from running / tokens per second (NaN: none)."""
ST_CLOCK_EW = 29
"""Actual clock averaged like the ITL estimate (the clock that estimate belongs to)."""
ST_PROMPT_EW = 30
"""Prompt tokens/s, smoothed over tens of seconds."""
ST_PREFILL_K = 31
"""Learned prefill capacity per MHz (prompt tokens/s per MHz while requests wait)."""
ST_PREFILL_MIN_MHZ = 32
"""Lowest clock keeping prefill headroom for bursts (NaN: not learned yet)."""
ST_TTFT_WORK = 33
"""The slowest recent first token as TTFT x clock (MHz s), decaying: prefill time scales as 1/f,
so this over the TTFT budget is the lowest clock that would have served it in time."""
ST_RAISED_FROM_MHZ = 34
"""The chosen clock before the current raise episode (NaN: none): the descent back to it is
geometric, below it cautious."""
ST_FINISHED_EW = 35
"""Finished requests per second, smoothed like the prompt rate (their ratio: prompt tokens
per request)."""
ST_CLOCK_HISTORY = 36
"""The highest clock each of the last _CLOCK_HISTORY_BUCKETS whole seconds before the current
one allowed (the higher of cap and actual clock, newest first), for blaming lagging signals."""
ST_PREFILL_RUN_S = ST_CLOCK_HISTORY + _CLOCK_HISTORY_BUCKETS
"""Seconds of consecutive ticks, up to the last, with requests waiting (0: none)."""
ST_PREFILL_TOKENS = ST_PREFILL_RUN_S + 1
"""Prompt tokens of the run by second: the current second so far, then the two before it."""
ST_PREFILL_MHZ_S = ST_PREFILL_TOKENS + _PREFILL_BUCKETS
"""Clock x seconds of the same seconds."""
ST_PREFILL_SAMPLES_S = ST_PREFILL_MHZ_S + _PREFILL_BUCKETS
"""Seconds of ticks that gave a capacity sample from a run so far (0: none)."""
ST_TIMED_TOKENS = ST_PREFILL_SAMPLES_S + 1
"""Where the server times its prefill passes: prompt tokens, decaying (_TIMED_HALF_LIFE_S)."""
ST_TIMED_S = ST_TIMED_TOKENS + 1
"""Seconds of prefill passes over the same decaying window."""
ST_TIMED_MHZ_S = ST_TIMED_S + 1
"""Clock x seconds of those passes."""
ST_TIME_S = ST_TIMED_MHZ_S + 1
"""Seconds of observation since the group's first tick (ticks' intervals added up)."""
ST_CLOCK_BUCKET_MHZ = ST_TIME_S + 1
"""The highest clock allowed in the current second so far (NaN: none yet)."""
ST_CLOCK_BUCKET_S = ST_CLOCK_BUCKET_MHZ + 1
"""Seconds into the current second of the clock history (ticks shorter than a second share it)."""
ST_PREFILL_BUCKET_S = ST_CLOCK_BUCKET_S + 1
"""Seconds in each second of ST_PREFILL_TOKENS (a tick longer than a second fills one alone)."""
ST_DESCENT_S = ST_PREFILL_BUCKET_S + _PREFILL_BUCKETS
"""Seconds of descent the base may still take (at most a second, or one tick when longer):
lets ticks shorter than a second lower by less than a clock step each."""
N_ST = ST_DESCENT_S + 1

# Tick rows: one group's tick as the stages of _group_step share it. Scratch, reused for each
# group: the tick's constants and what it observed, written before the stages that read them.
# What a stage smooths into state is read from state.
TK_INTERVAL_S = 0
TK_NOW_S = 1
"""ST_TIME_S at the end of this tick."""
TK_F_MAX_MHZ = 2
TK_FLOOR_MHZ = 3
"""The configured floor, at most f_max."""
TK_CLOCK_STEP_MHZ = 4
"""The step from f_max to the next supported clock below it (15 MHz when there is none)."""
TK_PREV_CAP_MHZ = 5
"""The cap the last tick emitted."""
TK_ITL_LINE_S = 6
"""The ITL SLO times the margin: latencies past it raise the clock."""
TK_TTFT_LINE_S = 7
"""The same for the TTFT."""
TK_F_NOW_MHZ = 8
"""The SM clock read (the last cap where none was read)."""
TK_GPU_COUNT = 9
TK_POWER_W = 10
"""Power per GPU over the tick (NaN: none)."""
TK_REALTIME = 11
"""1 where the server's counters move as tokens are made, 0 where they move at request end."""
TK_WEIGHT_S = 12
"""What the tick's samples weigh in the learned models."""
TK_GEN_TPS = 13
TK_PROMPT_TPS = 14
TK_ITL_Q_S = 15
TK_TTFT_S = 16
"""The tick's slowest first token where the server gives it, else its TTFT at the SLO's
quantile (NaN: none)."""
TK_WAITING = 17
TK_RUNNING = 18
TK_KV_USAGE = 19
TK_PREEMPTED = 20
"""1 when the server preempted a request during the tick, else 0."""
TK_WAITING_PREV = 21
"""The waiting count of the tick before (NaN: none)."""
TK_ITL_S = 22
"""The tick's ITL: the per-request estimate where there is one, else the ITL at the SLO's
quantile (NaN: none)."""
TK_ITL_MHZ = 23
"""The clock that ITL belongs to."""
TK_ITL_REF_S = 24
"""The smoothed ITL (ST_ITL_S) when the tick gave one, else NaN: lowering goes by it."""
TK_TTFT_REF_S = 25
"""The smoothed TTFT (ST_TTFT_S) when the tick gave one, else NaN."""
N_TK = 26

# Power-model fit layout: normal matrix (EFIT_N x EFIT_N), right-hand side, sum of y^2, sum of
# weights. Regressors: 1, gen ktok/s, prompt ktok/s, x = (clock - f_max) in GHz, x^2.
EFIT_N = 5
EFIT_X = 3  # the clock regressors come last: power_fit relies on it
EFIT_XX = 4
EFIT_B = EFIT_N * EFIT_N
EFIT_YY = EFIT_B + EFIT_N
EFIT_W = EFIT_YY + 1
N_EFIT = EFIT_W + 1

# A fitted power model: coefficients, residual variance, clock block of the inverse normal matrix.
FIT_THETA = 0
FIT_SIGMA2 = EFIT_N
FIT_V_X = EFIT_N + 1
FIT_V_X_XX = EFIT_N + 2
FIT_V_XX = EFIT_N + 3
FIT_WORK = EFIT_N + 4
N_FIT = FIT_WORK + EFIT_N

# Cell fields.
CELL_W_ITL = 0
CELL_ITL_SUM = 1
N_CELL = 2

# Miss record fields (per group and demand bin).
MISS_COUNT = 0
"""SLO misses blamed on a clock at this demand, decayed to MISS_TIME_S."""
MISS_MHZ = 1
"""Highest clock blamed for those misses."""
MISS_TIME_S = 2
"""ST_TIME_S of the last miss counted."""
N_MISS = 3

DEFAULT_LOAD_BINS = 12
DEFAULT_CLOCK_BINS = 16

# Output rows.
OUT_CAP_MHZ = 0
OUT_LIMIT_MW = 1
OUT_REASON = 2
OUT_TARGET_REACHED = 3
N_OUT = 4

REASON_STEADY = 0
REASON_LOWER = 1
REASON_RAISE_ITL = 2
REASON_RAISE_TTFT = 3
REASON_RAISE_QUEUE = 4
REASON_STALE = 5
REASON_OFF = 6
REASON_HOLD = 7
REASON_ENERGY = 8
REASON_TARGET = 9
REASON_ENERGY_FLOOR = 10
REASON_RAISE_KV = 11

# Tuning that is not user-facing. Smoothing factors (_ALPHA) are per second and decays (_DECAY)
# per second: _alpha_for and _decay_for convert them to a tick of any length.
_LOWER_BAND = 0.03
"""Lower only when latencies are this share below the margin line (hysteresis band)."""
_MISS_AIM = 0.9
"""A raise after a real SLO miss aims this far below the margin line."""
_HOLD_RAISE_S = 4.0
"""After a latency raise, seconds during which the clock is not lowered: the signals lag it."""
_HOLD_QUEUE_S = 8.0
"""The same after a queue past max_waiting or a preemption."""
_HOLD_QUEUE_GROWING_S = 1.0
"""The same after a raise for a growing queue, a full KV cache or a long prefill queue."""
_DITHER_SETTLED_S = 2.0
"""Seconds the base must have stood still before the dither."""
_DITHER_HALF_PERIOD_S = 1.0
"""The dither alternates up and down every this many seconds (every tick when ticks are
longer)."""
_MISS_MIN_GAP_S = 1.0
"""Misses at one demand bin count at most once a second: a tick shorter than that sees the same
miss again."""
_QUEUE_SLACK = 0.1
"""No slack to lower while more than this share of max_waiting requests wait."""
_QUEUE_MIN = 0.25
"""Share of max_waiting a queue must reach before its growth counts (admission queues of a
request or two are normal in continuous batching)."""
_QUEUE_TREND = 0.5
"""Requests per second of sustained queue growth that raise the clock."""
_QUEUE_TREND_ALPHA = 0.5
"""Smoothing factor per second of the queue's growth in requests per second (ST_QUEUE_TREND)."""
_DEMAND_ALPHA = 0.5
"""Smoothing factor per second of the generated and prompt tokens/s of a realtime server
(ST_DEMAND_TPS, ST_PROMPT_TPS)."""
_DEMAND_ALPHA_LUMPY = 0.2
"""For servers whose counters move at request end (not realtime)."""
_POWER_ALPHA = 0.3
"""Smoothing factor per second of the per-GPU power (ST_POWER_W)."""
_ITL_ALPHA = 0.3
"""Smoothing factor per second of the TTFT, and of the ITL quantile where there is no
per-request ITL estimate (ST_TTFT_S, ST_ITL_S)."""
_PROMPT_ALPHA = 0.05
"""Smoothing factor per second (about 20 s) of the prompt tokens/s and finished requests/s
the prefill headroom is sized from (ST_PROMPT_EW, ST_FINISHED_EW)."""
_PREFILL_UTIL = 0.6
"""Prefill is compute-bound (capacity ~ f): keep the smoothed prompt load at most this share of
the learned capacity, so a burst drains within the TTFT budget instead of queueing."""
_PREFILL_WAIT_SHARE = 0.1
"""Keep a new request's mean wait for prefill, predicted from the server's prompt-length mix, at
this share of the TTFT SLO (where the server has no prompt-length histogram, _PREFILL_UTIL)."""
_PREFILL_RATE_S = 3.0
"""Where a whole prompt is counted at its first token, learn the prefill capacity from runs of
this many seconds with requests waiting (at most _PREFILL_BUCKETS)."""
_PREFILL_MIN_SAMPLES_S = 4.0
"""There, the headroom bound waits for this many seconds of samples: the first runs with a
queue, in a quiet start, read the capacity low and would hold the clocks high for tens of
minutes."""
_TIMED_HALF_LIFE_S = 300.0
"""Where the server times its prefill passes (TGI), the capacity is the prompt tokens over the
clock x seconds of prefill of a window with this half-life: minutes, so that prompts counted
as they are admitted (at the mix's mean length) or as they end average out."""
_TIMED_MIN_S = 5.0
"""Seconds of timed prefill before that capacity is used."""
_PREFILL_BURST = 0.8
"""A tick with requests waiting and a prompt rate past this share of the learned prefill capacity
boosts the clock for that tick."""
_TTFT_WORK_DECAY = 0.98
"""About 50 s: long prompts come back within a minute or two when they come at all."""
_TTFT_WORK_AIM = 0.9
"""Serve the slowest recent first token within this share of the TTFT SLO."""
_GUARD_TTFT_SHARE = 0.3
"""Where a server reports the prompt work it still has to prefill (read at ticks and between
them): raise the cap at once to the clock that prefills it within this share of the TTFT SLO.
A burst's queue forms within a second at a lowered clock and outlasts a raise at the next
tick."""
_KV_FULL = 0.9
"""KV-cache usage from which the clock rises: a lower clock keeps each request longer, so more
run at once and hold more KV, and a server out of KV evicts requests to recompute their
prompts later, which stalls it whatever the clock (a preemption raises to f_max)."""
_QUEUE_WAIT_SHARE = 0.35
"""Raise at once when the waiting requests' prefill would take longer than this share of the
TTFT SLO at the current clock."""
_DESCENT_SHARE = 0.25
"""With slack after a raise, lower by this share of the way back per second (at least
_DESCENT_STEPS_PER_S, at most max_step_down a tick): the same slack at a high clock costs the
most."""
_DESCENT_STEPS_PER_S = 3.0
"""With slack, lower by this many clock steps a second."""
_DESCENT_JITTER = 0.95
"""Seconds of descent within this share of a second (or of a longer configured tick) count as
the full one."""
_TPOT_ALPHA = 0.2
"""About 5 s: the life of a typical request's decode (a few hundred tokens at 10-50 ms)."""
_CELL_DECAY = 0.99
"""The latency cells forget over about 100 s; a tick adds its seconds of latency (x weight)."""
_EFIT_DECAY = 0.98
"""The power model forgets over about 50 s; a tick adds its seconds (x weight)."""
_EFIT_MIN_W = 10.0
"""Seconds of (weighted) power samples before the power model is fitted."""
_ENERGY_BLOCK_T = -1.0
"""Power rises significantly as the clock falls: do not lower further (left side of the U)."""
_ENERGY_RAISE_T = -2.0
"""t-statistic of the power model's slope at the base below which the base rises a clock step:
power falls significantly as the clock rises (left side of the U)."""
_CURVATURE_T = 3.0
"""t-statistic the power model's curvature must reach before its vertex is taken as the
energy-optimal clock."""
_POWER_RESOLUTION = 0.005
"""Floor of the power model's residual standard deviation, as a share of the mean power sample
(see power_fit)."""
_RIDGE = 1e-6
"""Per unit weight; far below what the dither gives x (about 1e-4), enough for a constant one."""
_KAPPA_PRIOR = 0.7
"""Knee near 0.6-0.7 f_max for small-batch decode (dvfs_plant_model.md section 6c)."""
_KAPPA_PRIOR_W = 3.0
"""Weight of _KAPPA_PRIOR in fit_kappa, in seconds of (weighted) latency; the cells' evidence
counts up to 30 s."""
_KAPPA_MIN = 0.2
"""Lowest fitted knee share of f_max (also the fit where latency does not rise as the clock
falls)."""
_KAPPA_MAX = 1.5
"""Highest fitted knee share of f_max (also the fit whose memory-bound intercept is not
positive)."""
_W_MIN_ITL = 0.8
"""Seconds of (weighted) latency a cell needs to count."""
_MISS_DECAY = 0.99
"""A clock blamed for an SLO miss stays suspect for ~70 s per miss (bursts cause misses too; a
clock that keeps missing is avoided for longer)."""
_MISS_ACTIVE = 0.5
"""Decayed miss count from which a demand bin's blamed clock counts as unsafe; below it a new
miss starts the record again at its own clock."""
_TPJ_DECAY = 0.9
"""Decay per second (about 10 s) of the token and energy sums whose ratio is the tokens per
joule of target mode and of the budget's weights (ST_TPJ)."""
_TARGET_BAND = 0.03
"""In target mode, the target clock rises a clock step per second while tokens per joule are
more than this share above the target."""
_TARGET_TOL = 0.02
"""In target mode, the target counts as reached from this share below it on
(OUT_TARGET_REACHED)."""
_LIMIT_HEADROOM = 1.25
"""Outside budget mode, a tracked power limit is the per-GPU power peak times this plus
_LIMIT_HEADROOM_W."""
_LIMIT_HEADROOM_W = 30.0
"""Watts per GPU added to the tracked power limit."""
_PEAK_DECAY = 0.99
"""Decay per second (about 100 s) of the per-GPU power peak (ST_POWER_PEAK_W)."""
_BUDGET_NEED_HEADROOM = 1.15
"""In budget mode a group under no pressure needs its smoothed per-GPU power times this plus
_BUDGET_NEED_W (one under pressure, its maximum limit)."""
_BUDGET_NEED_W = 20.0
"""Watts per GPU added to a group's budget need."""


@jit
def _finite(x: float) -> bool:
    return not math.isnan(x) and not math.isinf(x)


@jit
def _pow4(x: float) -> float:
    x2 = x * x
    return x2 * x2


@jit
def _root4(x: float) -> float:
    return math.sqrt(math.sqrt(x))


@jit
def clamp_clock_down(clocks: np.ndarray, n: int, clock_mhz: float) -> float:
    """The highest of clocks[:n] at or below clock_mhz (the lowest if none); clock_mhz if n == 0."""
    if n <= 0:
        return clock_mhz
    target = clock_mhz + 1e-6
    if target < clocks[0]:
        return float(clocks[0])
    lo = 0
    hi = n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if clocks[mid] <= target:
            lo = mid
        else:
            hi = mid - 1
    return float(clocks[lo])


@jit
def clamp_clock_up(clocks: np.ndarray, n: int, clock_mhz: float) -> float:
    """The lowest of clocks[:n] at or above clock_mhz (the highest if none); clock_mhz if n == 0."""
    if n <= 0:
        return clock_mhz
    target = clock_mhz - 1e-6
    if target > clocks[n - 1]:
        return float(clocks[n - 1])
    lo = 0
    hi = n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if clocks[mid] >= target:
            hi = mid
        else:
            lo = mid + 1
    return float(clocks[lo])


@jit
def roofline_ratio(kappa: float, f_max: float, f_to: float, f_from: float) -> float:
    """t(f_to)/t(f_from) for t(f) = [1 + (kappa*f_max/f)^4]^(1/4) (plant model section 6c, p=4)."""
    a = _pow4(kappa * f_max / f_to)
    b = _pow4(kappa * f_max / f_from)
    return _root4((1.0 + a) / (1.0 + b))


@jit
def roofline_inverse(
    kappa: float, f_max: float, f_from: float, latency_from: float, aim: float
) -> float:
    """The lowest clock whose roofline latency, anchored at latency_from at f_from, is <= aim.

    Returns +inf when no clock reaches aim (the memory-bound floor of the roofline is above it).
    """
    q = _pow4(aim / latency_from) * (1.0 + _pow4(kappa * f_max / f_from))
    if q <= 1.0:
        return math.inf
    return kappa * f_max / _root4(q - 1.0)


@jit
def load_bin(demand_tps: float, n_bins: int) -> int:
    """Demand bin: one octave of generated tokens/s per bin, from 16 tok/s (bin 0 below)."""
    if not demand_tps >= 32.0:
        return 0
    b = math.floor(math.log2(demand_tps / 16.0))
    if b > n_bins - 1:
        return n_bins - 1
    return b


@jit
def fit_kappa(cells_l: np.ndarray, floor_mhz: float, width_mhz: float, f_max: float) -> float:
    """Knee share kappa of the latency roofline from one demand bin's cells, shrunk to a prior.

    Fits y = A + B*x with x = (f_max/f)^4 and y = latency^4 over the cells with data; kappa is
    (B/A)^(1/4). Too little spread in clock gives the prior.
    """
    sw = 0.0
    sx = 0.0
    sy = 0.0
    sxx = 0.0
    sxy = 0.0
    x_lo = math.inf
    x_hi = -math.inf
    y_ref = 0.0
    n_clock_bins = cells_l.shape[0]
    for c in range(n_clock_bins):
        w = cells_l[c, CELL_W_ITL]
        if w < _W_MIN_ITL:
            continue
        latency = cells_l[c, CELL_ITL_SUM] / w
        if not latency > 0.0:
            continue
        if y_ref == 0.0:
            y_ref = latency
        f = floor_mhz + (c + 0.5) * width_mhz
        x = _pow4(f_max / f)
        y = _pow4(latency / y_ref)
        sw += w
        sx += w * x
        sy += w * y
        sxx += w * x * x
        sxy += w * x * y
        x_lo = min(x_lo, x)
        x_hi = max(x_hi, x)
    # Clocks less than ~10 % apart do not pin the knee down against p95 noise.
    if sw <= 0.0 or x_hi - x_lo < 0.5 * x_lo:
        return _KAPPA_PRIOR
    mx = sx / sw
    my = sy / sw
    var = sxx / sw - mx * mx
    if var <= 0.0:
        return _KAPPA_PRIOR
    slope = (sxy / sw - mx * my) / var
    intercept = my - slope * mx
    if slope <= 0.0:
        kappa = _KAPPA_MIN
    elif intercept <= 0.0:
        kappa = _KAPPA_MAX
    else:
        kappa = min(max(_root4(slope / intercept), _KAPPA_MIN), _KAPPA_MAX)
    evidence = min(sw, 30.0)
    return (evidence * kappa + _KAPPA_PRIOR_W * _KAPPA_PRIOR) / (evidence + _KAPPA_PRIOR_W)


@jit
def _alpha_for(alpha: float, interval_s: float) -> float:
    """The smoothing factor over interval_s of one that is alpha over a second (exactly alpha at
    1 s)."""
    if interval_s == 1.0:
        return alpha
    return 1.0 - (1.0 - alpha) ** interval_s


@jit
def _decay_for(decay: float, interval_s: float) -> float:
    """What is left after interval_s of a decay that leaves `decay` after a second."""
    if interval_s == 1.0:
        return decay
    return decay**interval_s


@jit
def _miss_weight(count: float, miss_s: float, now_s: float) -> float:
    if count <= 0.0:
        return 0.0
    return count * _MISS_DECAY ** (now_s - miss_s)


@jit
def record_miss(record: np.ndarray, clock_mhz: float, now_s: float, interval_s: float) -> None:
    """Blame an SLO miss at now_s (seconds) on clock_mhz in a demand bin's record (decaying count,
    highest clock). A miss within _MISS_MIN_GAP_S of the last one counted (to the nearest tick
    of interval_s) only raises the clock blamed: a short tick sees the same miss again."""
    if record[MISS_COUNT] > 0.0 and (
        now_s - record[MISS_TIME_S] < _MISS_MIN_GAP_S - 0.5 * interval_s
    ):
        record[MISS_MHZ] = max(record[MISS_MHZ], clock_mhz)
        return
    weight = _miss_weight(record[MISS_COUNT], record[MISS_TIME_S], now_s)
    if weight < _MISS_ACTIVE:
        record[MISS_MHZ] = clock_mhz
    record[MISS_COUNT] = weight + 1.0
    record[MISS_TIME_S] = now_s
    record[MISS_MHZ] = max(record[MISS_MHZ], clock_mhz)


@jit
def learned_safe_mhz(misses_g: np.ndarray, load: int, clock_step_mhz: float, now_s: float) -> float:
    """One clock step above the highest recent miss at this demand bin or any lower one (a clock
    that missed at a lower demand misses at this one too); -inf when there is none."""
    safe = -math.inf
    # Scalar reads, not a view per bin: this runs for every group every tick.
    for lb in range(load + 1):
        count = misses_g[lb, MISS_COUNT]
        if count > 0.0 and _miss_weight(count, misses_g[lb, MISS_TIME_S], now_s) >= _MISS_ACTIVE:
            safe = max(safe, misses_g[lb, MISS_MHZ] + clock_step_mhz)
    return safe


@jit
def power_fit(efit_g: np.ndarray, chol: np.ndarray, fit: np.ndarray, sample_s: float = 1.0) -> bool:
    """Fit the power model from its normal equations into fit[N_FIT]; False without enough data.

    fit holds the coefficients, the residual variance (per second of weight) and the clock block
    of the inverse normal matrix (for the variance of the slope at any clock). chol:
    float64[EFIT_N, EFIT_N] work space. sample_s: the seconds each sample was weighted by (the
    tick), so that the residual's degrees of freedom count samples, not seconds.
    """
    fit[FIT_SIGMA2] = math.nan
    w = efit_g[EFIT_W]
    if w < _EFIT_MIN_W:
        return False
    for i in range(EFIT_N):
        for j in range(EFIT_N):
            chol[i, j] = 0.0
    for i in range(EFIT_N):
        for j in range(i + 1):
            s = efit_g[i * EFIT_N + j]
            # Ridge on the slopes, not the intercept: a regressor that never varies reads as 0.
            if i == j and i > 0:
                s += _RIDGE * w
            for k in range(j):
                s -= chol[i, k] * chol[j, k]
            if i == j:
                if s <= 0.0:
                    return False
                chol[i, i] = math.sqrt(s)
            else:
                chol[i, j] = s / chol[j, j]
    # theta from L L^T theta = b: forward, then back substitution (scalar reads, no views).
    for i in range(EFIT_N):
        s = efit_g[EFIT_B + i]
        for k in range(i):
            s -= chol[i, k] * fit[FIT_THETA + k]
        fit[FIT_THETA + i] = s / chol[i, i]
    for i in range(EFIT_N - 1, -1, -1):
        s = fit[FIT_THETA + i]
        for k in range(i + 1, EFIT_N):
            s -= chol[k, i] * fit[FIT_THETA + k]
        fit[FIT_THETA + i] = s / chol[i, i]
    rss = efit_g[EFIT_YY]
    for i in range(EFIT_N):
        theta_i = fit[FIT_THETA + i]
        rss -= 2.0 * theta_i * efit_g[EFIT_B + i]
        for j in range(EFIT_N):
            rss += theta_i * efit_g[i * EFIT_N + j] * fit[FIT_THETA + j]
    # The clock block of the inverse, A^-1 = L^-T L^-1: X and XX are the last two regressors,
    # so it needs only the trailing 2 x 2 block of L (the unit-vector solves, written out).
    l_x = chol[EFIT_X, EFIT_X]
    l_xx = chol[EFIT_XX, EFIT_XX]
    l_cross = chol[EFIT_XX, EFIT_X]
    inv_x = 1.0 / l_x
    v_x_xx = (-(l_cross * inv_x) / l_xx) / l_xx
    fit[FIT_V_X] = (inv_x - l_cross * v_x_xx) / l_x
    fit[FIT_V_X_XX] = v_x_xx
    fit[FIT_V_XX] = (1.0 / l_xx) / l_xx
    # Energy counters resolve power to about 1 %: a perfect fit must not make noise significant.
    mean_y = efit_g[EFIT_B] / w
    dof = max(w / sample_s - EFIT_N, 1.0)
    fit[FIT_SIGMA2] = max(max(rss, 0.0) / dof, (_POWER_RESOLUTION * mean_y) ** 2)
    return True


@jit
def power_slope_at(fit: np.ndarray, clock_mhz: float, f_max: float) -> tuple[float, float]:
    """d(power per GPU)/d(clock) in W/MHz at clock_mhz from the fitted model, and its t-statistic.

    (0, 0) when the model is not fitted.
    """
    sigma2 = fit[FIT_SIGMA2]
    if not _finite(sigma2):
        return 0.0, 0.0
    x = (clock_mhz - f_max) / 1000.0
    slope = fit[FIT_THETA + EFIT_X] + 2.0 * x * fit[FIT_THETA + EFIT_XX]
    var = sigma2 * (fit[FIT_V_X] + 4.0 * x * fit[FIT_V_X_XX] + 4.0 * x * x * fit[FIT_V_XX])
    # y is in W/100 and x in GHz.
    slope_w_per_mhz = slope * 100.0 / 1000.0
    if var <= 0.0:
        return slope_w_per_mhz, 0.0
    return slope_w_per_mhz, slope / math.sqrt(var)


@jit
def power_vertex_mhz(fit: np.ndarray, f_max: float) -> float:
    """The clock of least power of the fitted quadratic; NaN unless its curvature is significant."""
    sigma2 = fit[FIT_SIGMA2]
    curvature = fit[FIT_THETA + EFIT_XX]
    if not _finite(sigma2) or not curvature > 0.0:
        return math.nan
    var = sigma2 * fit[FIT_V_XX]
    if var > 0.0 and curvature / math.sqrt(var) < _CURVATURE_T:
        return math.nan
    return f_max + 1000.0 * (-fit[FIT_THETA + EFIT_X] / (2.0 * curvature))


@jit
def water_fill(room: np.ndarray, weight: np.ndarray, amount: float, alloc: np.ndarray) -> None:
    """Share amount in proportion to weight, no entry above its room; writes alloc (same length)."""
    n = room.shape[0]
    ratio = np.empty(n)
    total_w = 0.0
    for i in range(n):
        alloc[i] = 0.0
        if weight[i] > 0.0 and room[i] > 0.0:
            ratio[i] = room[i] / weight[i]
            total_w += weight[i]
        else:
            ratio[i] = math.inf
    order = np.argsort(ratio, kind="mergesort")
    left = amount
    for k in range(n):
        i = order[k]
        if not ratio[i] < math.inf or total_w <= 0.0 or left <= 0.0:
            break
        share = left * weight[i] / total_w
        if share >= room[i]:
            alloc[i] = room[i]
            left -= room[i]
        else:
            alloc[i] = share
            left -= share
        total_w -= weight[i]


@jit
def allocate_budget(
    budget_mw: float,
    gpu_count: np.ndarray,
    limit_min_mw: np.ndarray,
    limit_max_mw: np.ndarray,
    need_mw: np.ndarray,
    fixed_mw: np.ndarray,
    weight: np.ndarray,
    limit_mw: np.ndarray,
) -> bool:
    """Per-GPU power limits whose sum over all GPUs stays within budget_mw.

    Groups with a finite fixed_mw keep that per-GPU limit (stale groups their last share) and
    count against the budget. The rest get at least their minimum; the remainder goes first to
    each group's need (per GPU), in proportion to weight when it does not cover every need, and
    what is left over after all needs is shared in proportion to the headroom up to the maximum.
    Writes limit_mw (whole mW); returns False when even the minimums exceed the budget.
    """
    n = gpu_count.shape[0]
    left = budget_mw
    for i in range(n):
        if _finite(fixed_mw[i]):
            left -= fixed_mw[i] * gpu_count[i]
        else:
            left -= limit_min_mw[i] * gpu_count[i]
    if left < 0.0:
        for i in range(n):
            limit_mw[i] = fixed_mw[i] if _finite(fixed_mw[i]) else limit_min_mw[i]
        return False
    room = np.zeros(n)
    w = np.zeros(n)
    total_room = 0.0
    for i in range(n):
        if not _finite(fixed_mw[i]):
            need = min(max(need_mw[i], limit_min_mw[i]), limit_max_mw[i])
            room[i] = (need - limit_min_mw[i]) * gpu_count[i]
            w[i] = room[i] * weight[i]
            total_room += room[i]
    alloc = np.zeros(n)
    if left <= total_room:
        water_fill(room, w, left, alloc)
        for i in range(n):
            if not _finite(fixed_mw[i]):
                limit_mw[i] = math.floor(limit_min_mw[i] + alloc[i] / gpu_count[i])
            else:
                limit_mw[i] = fixed_mw[i]
        return True
    left -= total_room
    total_head = 0.0
    for i in range(n):
        if not _finite(fixed_mw[i]):
            alloc[i] = limit_min_mw[i] * gpu_count[i] + room[i]
            total_head += limit_max_mw[i] * gpu_count[i] - alloc[i]
    share = 1.0 if total_head <= left else left / total_head
    for i in range(n):
        if _finite(fixed_mw[i]):
            limit_mw[i] = fixed_mw[i]
        else:
            head = limit_max_mw[i] * gpu_count[i] - alloc[i]
            per_gpu = (alloc[i] + share * head) / gpu_count[i]
            limit_mw[i] = math.floor(min(per_gpu, limit_max_mw[i]))
    return True


@jit
def _ewma(old: float, new: float, alpha: float) -> float:
    if not _finite(new):
        return old
    if not _finite(old):
        return new
    return old + alpha * (new - old)


@jit
def _reset_group(g: int, f_max: float, state: np.ndarray) -> None:
    for r in range(N_ST):
        state[r, g] = math.nan
    state[ST_READY, g] = 1.0
    state[ST_BASE_MHZ, g] = f_max
    state[ST_CAP_MHZ, g] = f_max
    state[ST_TARGET_MHZ, g] = f_max
    state[ST_HOLD_S, g] = 0.0
    state[ST_SETTLED_S, g] = 0.0
    state[ST_TOKENS_EW, g] = 0.0
    state[ST_ENERGY_EW, g] = 0.0
    state[ST_KAPPA, g] = _KAPPA_PRIOR
    state[ST_SLOPE_W_PER_MHZ, g] = 0.0
    state[ST_SLOPE_T, g] = 0.0
    state[ST_LOAD_BIN, g] = 0.0
    state[ST_PRESSURE, g] = 0.0
    state[ST_TIMED_TOKENS, g] = 0.0
    state[ST_TIMED_S, g] = 0.0
    state[ST_TIMED_MHZ_S, g] = 0.0
    state[ST_TIME_S, g] = 0.0
    state[ST_CLOCK_BUCKET_S, g] = 0.0
    state[ST_DESCENT_S, g] = 0.0


@_inline_jit
def _tick_interval_s(observed_s: float, configured_s: float) -> float:
    """The tick's length in seconds: as observed, else as configured, else 1 s."""
    interval_s = observed_s
    if not (interval_s > 0.0 and _finite(interval_s)):
        interval_s = configured_s
        if not (interval_s > 0.0 and _finite(interval_s)):
            interval_s = 1.0
    return interval_s


@_inline_jit
def _hold_at_f_max(
    g: int, f_max: float, mode: int, reason: int, state: np.ndarray, out: np.ndarray
) -> None:
    """Return group g to default clocks at once: base, cap and target at f_max, no hold, and
    outside budget mode the default power limit; out says so with reason."""
    state[ST_BASE_MHZ, g] = f_max
    state[ST_CAP_MHZ, g] = f_max
    state[ST_TARGET_MHZ, g] = f_max
    state[ST_HOLD_S, g] = 0.0
    if mode != MODE_BUDGET:
        # In budget mode the limit stays: controller_step keeps it within the budget.
        state[ST_LIMIT_MW, g] = math.nan
    out[OUT_CAP_MHZ, g] = f_max
    out[OUT_LIMIT_MW, g] = math.nan
    out[OUT_REASON, g] = reason


@_inline_jit
def _sense(g: int, obs: np.ndarray, tick: np.ndarray) -> None:
    """Read group g's observation into tick (TK_F_NOW_MHZ to TK_PREEMPTED): NaN or a fallback
    where the sensors or the server gave nothing usable. Reads TK_INTERVAL_S, TK_PREV_CAP_MHZ."""
    interval_s = tick[TK_INTERVAL_S]
    gpu_count = obs[OBS_GPU_COUNT, g]
    if not gpu_count >= 1.0:
        gpu_count = 1.0
    f_now = obs[OBS_SM_CLOCK_MHZ, g]
    if not (f_now > 0.0 and _finite(f_now)):
        f_now = tick[TK_PREV_CAP_MHZ]
    realtime = obs[OBS_REALTIME, g] > 0.5
    weight = 1.0 if realtime else 0.3
    energy_j = obs[OBS_ENERGY_J, g]
    if energy_j >= 0.0 and _finite(energy_j):
        power_gpu_w = energy_j / interval_s / gpu_count
    elif obs[OBS_POWER_W, g] >= 0.0 and _finite(obs[OBS_POWER_W, g]):
        power_gpu_w = obs[OBS_POWER_W, g] / gpu_count
    else:
        power_gpu_w = math.nan
    gen_tps = obs[OBS_GEN_TPS, g]
    if not gen_tps >= 0.0:
        gen_tps = math.nan
    prompt_tps = obs[OBS_PROMPT_TPS, g]
    if not prompt_tps >= 0.0:
        prompt_tps = 0.0 if _finite(gen_tps) else math.nan
    itl_q = obs[OBS_ITL_Q_S, g]
    if not itl_q > 0.0:
        itl_q = math.nan
    # The slowest first tokens of the tick, where the server's histogram gives them: its quantile
    # reads a lone slow request as near the top of a wide bucket (1-2.5 s in vLLM's).
    ttft = obs[OBS_TTFT_SLOWEST_S, g]
    if not ttft > 0.0:
        ttft = obs[OBS_TTFT_Q_S, g]
    if not ttft > 0.0:
        ttft = math.nan
    tick[TK_F_NOW_MHZ] = f_now
    tick[TK_GPU_COUNT] = gpu_count
    tick[TK_POWER_W] = power_gpu_w
    tick[TK_REALTIME] = 1.0 if realtime else 0.0
    # A tick weighs what its seconds do: the estimate is smoothed over seconds, not ticks.
    tick[TK_WEIGHT_S] = weight * interval_s
    tick[TK_GEN_TPS] = gen_tps
    tick[TK_PROMPT_TPS] = prompt_tps
    tick[TK_ITL_Q_S] = itl_q
    tick[TK_TTFT_S] = ttft
    tick[TK_WAITING] = obs[OBS_WAITING, g]
    tick[TK_RUNNING] = obs[OBS_RUNNING, g]
    tick[TK_KV_USAGE] = obs[OBS_KV_USAGE, g]
    tick[TK_PREEMPTED] = 1.0 if obs[OBS_PREEMPTIONS, g] > 0.0 else 0.0


@_inline_jit
def _smooth_load(g: int, obs: np.ndarray, state: np.ndarray, tick: np.ndarray) -> None:
    """Smooth group g's token rates, queue and finished requests into state (ST_DEMAND_TPS,
    ST_PROMPT_TPS, ST_WAITING, ST_QUEUE_TREND, ST_PROMPT_EW, ST_FINISHED_EW); the waiting count
    it replaces goes to tick[TK_WAITING_PREV]."""
    interval_s = tick[TK_INTERVAL_S]
    realtime = tick[TK_REALTIME] > 0.5
    gen_tps = tick[TK_GEN_TPS]
    prompt_tps = tick[TK_PROMPT_TPS]
    waiting = tick[TK_WAITING]
    # Counters that move at request end are lumpy: smooth them harder (inference_server_metrics).
    alpha_d = _alpha_for(_DEMAND_ALPHA if realtime else _DEMAND_ALPHA_LUMPY, interval_s)
    demand = _ewma(state[ST_DEMAND_TPS, g], gen_tps, alpha_d)
    state[ST_DEMAND_TPS, g] = demand
    state[ST_PROMPT_TPS, g] = _ewma(state[ST_PROMPT_TPS, g], prompt_tps, alpha_d)
    waiting_prev = state[ST_WAITING, g]
    state[ST_WAITING, g] = waiting
    tick[TK_WAITING_PREV] = waiting_prev
    queue_trend = state[ST_QUEUE_TREND, g]
    if _finite(waiting) and _finite(waiting_prev):
        queue_trend = _ewma(
            queue_trend,
            (waiting - waiting_prev) / interval_s,
            _alpha_for(_QUEUE_TREND_ALPHA, interval_s),
        )
    elif not _finite(waiting):
        queue_trend = math.nan
    state[ST_QUEUE_TREND, g] = queue_trend
    alpha_prompt = _alpha_for(_PROMPT_ALPHA, interval_s)
    prompt_ew = _ewma(state[ST_PROMPT_EW, g], prompt_tps, alpha_prompt)
    state[ST_PROMPT_EW, g] = prompt_ew
    finished_ew = _ewma(state[ST_FINISHED_EW, g], obs[OBS_FINISHED_RPS, g], alpha_prompt)
    state[ST_FINISHED_EW, g] = finished_ew


@_inline_jit
def _estimate_latency(g: int, state: np.ndarray, tick: np.ndarray) -> None:
    """Estimate group g's per-request ITL and smooth its latencies into state (ST_RUNNING_EW,
    ST_GEN_EW, ST_CLOCK_EW, ST_ITL_S, ST_ITL_EST_S, ST_TTFT_S, ST_TTFT_WORK); the tick's ITL,
    its clock and the latencies lowering goes by into tick (TK_ITL_S to TK_TTFT_REF_S)."""
    interval_s = tick[TK_INTERVAL_S]
    f_now = tick[TK_F_NOW_MHZ]
    realtime = tick[TK_REALTIME] > 0.5
    gen_tps = tick[TK_GEN_TPS]
    itl_q = tick[TK_ITL_Q_S]
    ttft = tick[TK_TTFT_S]
    running = tick[TK_RUNNING]
    # Per-request inter-token latency by Little's law: every running request gets one token per
    # iteration, so running / tokens-per-second is the mean iteration time all of them share,
    # and its average over a request's life (a few seconds) is that request's mean ITL. The
    # servers' token-level ITL quantile is dominated by chunked-prefill stalls a request
    # averages out; it stays a tail guard, and the signal where the estimate is unavailable.
    tpot = math.nan
    f_itl = f_now
    if realtime and running >= 1.0 and gen_tps > 0.0:
        alpha_tpot = _alpha_for(_TPOT_ALPHA, interval_s)
        run_ew = _ewma(state[ST_RUNNING_EW, g], running, alpha_tpot)
        gen_ew = _ewma(state[ST_GEN_EW, g], gen_tps, alpha_tpot)
        state[ST_RUNNING_EW, g] = run_ew
        state[ST_GEN_EW, g] = gen_ew
        tpot = run_ew / gen_ew
        # The estimate averages the last few seconds, so it belongs to their average clock.
        clock_ew = _ewma(state[ST_CLOCK_EW, g], f_now, alpha_tpot)
        state[ST_CLOCK_EW, g] = clock_ew
    elif realtime and running >= 1.0 and not _finite(gen_tps):
        # No token count this tick (a counter the server adds to in batches stood still): the
        # requests' mean ITL is what it last was, not the token-level quantile.
        tpot = state[ST_ITL_EST_S, g]
        clock_ew = state[ST_CLOCK_EW, g]
    alpha_itl = _alpha_for(_ITL_ALPHA, interval_s)
    if _finite(tpot):
        itl = tpot
        itl_s = tpot
        f_itl = clock_ew
    else:
        itl = itl_q
        itl_s = _ewma(state[ST_ITL_S, g], itl_q, alpha_itl)
    state[ST_ITL_S, g] = itl_s
    state[ST_ITL_EST_S, g] = tpot
    ttft_s = _ewma(state[ST_TTFT_S, g], ttft, alpha_itl)
    state[ST_TTFT_S, g] = ttft_s
    ttft_work = state[ST_TTFT_WORK, g] * _decay_for(_TTFT_WORK_DECAY, interval_s)
    if _finite(ttft):
        f_prefill = state[ST_CLOCK_EW, g] if _finite(state[ST_CLOCK_EW, g]) else f_now
        ttft_work = max(ttft_work, ttft * f_prefill) if _finite(ttft_work) else ttft * f_prefill
    state[ST_TTFT_WORK, g] = ttft_work
    tick[TK_ITL_S] = itl
    tick[TK_ITL_MHZ] = f_itl
    # Smoothed latencies for lowering (one tick's quantile is noisy); NaN when none came.
    tick[TK_ITL_REF_S] = itl_s if _finite(itl) else math.nan
    tick[TK_TTFT_REF_S] = ttft_s if _finite(ttft) else math.nan


@_inline_jit
def _learn_prefill_capacity(g: int, obs: np.ndarray, state: np.ndarray, tick: np.ndarray) -> float:
    """Update group g's prefill capacity per MHz (ST_PREFILL_K, NaN until learned) from the
    tick's prompt work, timed (ST_TIMED_*) or over runs of ticks with a queue (ST_PREFILL_*),
    and return it."""
    interval_s = tick[TK_INTERVAL_S]
    f_now = tick[TK_F_NOW_MHZ]
    prompt_tps = tick[TK_PROMPT_TPS]
    waiting = tick[TK_WAITING]
    prefill_k = state[ST_PREFILL_K, g]
    per_chunk = obs[OBS_PROMPT_PER_CHUNK, g] > 0.5
    run = state[ST_PREFILL_RUN_S, g]
    # Raises for the backlog did part of the interval's prompt work above the cap chosen.
    f_work = obs[OBS_INTERVAL_CAP_MHZ, g]
    if not f_work > 0.0:
        f_work = f_now
    busy_s = obs[OBS_PREFILL_BUSY_S, g]
    if busy_s >= 0.0 and prompt_tps >= 0.0:
        # The server times its prefill passes: tokens per second of prefill is the capacity
        # itself, from every tick with prompt work rather than from ticks with a queue.
        keep = 0.5 ** (interval_s / _TIMED_HALF_LIFE_S)
        timed_tokens = state[ST_TIMED_TOKENS, g] * keep + prompt_tps * interval_s
        timed_s = state[ST_TIMED_S, g] * keep + busy_s
        timed_mhz_s = state[ST_TIMED_MHZ_S, g] * keep + busy_s * f_work
        state[ST_TIMED_TOKENS, g] = timed_tokens
        state[ST_TIMED_S, g] = timed_s
        state[ST_TIMED_MHZ_S, g] = timed_mhz_s
        if timed_s >= _TIMED_MIN_S and timed_tokens > 0.0:
            prefill_k = timed_tokens / timed_mhz_s
        run = 0.0
    elif waiting >= 1.0 and prompt_tps >= 0.0:
        # Requests wait while prompts are processed: the prefill budget is the bottleneck, or
        # close to it. The highest such rate per MHz approaches the capacity from below.
        starting = not run > 0.0
        run = interval_s if starting else run + interval_s
        rate_per_mhz = math.nan
        if per_chunk:
            if prompt_tps > 0.0:
                rate_per_mhz = prompt_tps / f_work
        else:
            rate_per_mhz = _prefill_run_rate(
                g, state, interval_s, prompt_tps, f_work, run, starting
            )
        if _finite(rate_per_mhz):
            prefill_k = max(rate_per_mhz, prefill_k) if _finite(prefill_k) else rate_per_mhz
    else:
        run = 0.0
    state[ST_PREFILL_RUN_S, g] = run
    state[ST_PREFILL_K, g] = prefill_k
    return prefill_k


@_inline_jit
def _prefill_run_rate(
    g: int,
    state: np.ndarray,
    interval_s: float,
    prompt_tps: float,
    f_work: float,
    run: float,
    starting: bool,
) -> float:
    """Where the server counts a whole prompt at its first token: prompt tokens per MHz over the
    last _PREFILL_RATE_S of a run of run seconds with requests waiting (NaN before then or
    without tokens). Keeps the run by second in the ST_PREFILL_* rows."""
    rate_per_mhz = math.nan
    # A whole prompt is counted in the tick of its first token, after seconds of work:
    # one second over-reads the capacity by up to that prompt, a run of seconds much
    # less. The run is kept by second, the current one first (to the nearest tick).
    if starting:
        state[ST_PREFILL_TOKENS, g] = 0.0
        state[ST_PREFILL_MHZ_S, g] = 0.0
        state[ST_PREFILL_BUCKET_S, g] = 0.0
    state[ST_PREFILL_TOKENS, g] += prompt_tps * interval_s
    state[ST_PREFILL_MHZ_S, g] += f_work * interval_s
    state[ST_PREFILL_BUCKET_S, g] += interval_s
    enough_s = _PREFILL_RATE_S - 0.5 * min(interval_s, 1.0)
    if run >= enough_s:
        tokens = state[ST_PREFILL_TOKENS, g]
        mhz_s = state[ST_PREFILL_MHZ_S, g]
        span_s = state[ST_PREFILL_BUCKET_S, g]
        for j in range(1, _PREFILL_BUCKETS):
            if span_s >= enough_s:
                break
            tokens += state[ST_PREFILL_TOKENS + j, g]
            mhz_s += state[ST_PREFILL_MHZ_S + j, g]
            span_s += state[ST_PREFILL_BUCKET_S + j, g]
        if tokens > 0.0:
            rate_per_mhz = tokens / mhz_s
            samples = state[ST_PREFILL_SAMPLES_S, g]
            state[ST_PREFILL_SAMPLES_S, g] = samples + interval_s if samples > 0.0 else interval_s
    if state[ST_PREFILL_BUCKET_S, g] >= 1.0 - 0.5 * interval_s:
        for j in range(_PREFILL_BUCKETS - 1, 0, -1):
            state[ST_PREFILL_TOKENS + j, g] = state[ST_PREFILL_TOKENS + j - 1, g]
            state[ST_PREFILL_MHZ_S + j, g] = state[ST_PREFILL_MHZ_S + j - 1, g]
            state[ST_PREFILL_BUCKET_S + j, g] = state[ST_PREFILL_BUCKET_S + j - 1, g]
        state[ST_PREFILL_TOKENS, g] = 0.0
        state[ST_PREFILL_MHZ_S, g] = 0.0
        state[ST_PREFILL_BUCKET_S, g] = 0.0
    return rate_per_mhz


@_inline_jit
def _prefill_bounds(
    g: int,
    obs: np.ndarray,
    params: np.ndarray,
    state: np.ndarray,
    tick: np.ndarray,
    prefill_k: float,
) -> tuple[float, float, float]:
    """From group g's prefill capacity per MHz: the seconds its queue takes to prefill at this
    clock (NaN: unknown), the lowest clock keeping prefill headroom (ST_PREFILL_MIN_MHZ; NaN:
    not learned yet) and the clock a prompt burst boosts this tick's cap to (-inf: none)."""
    f_now = tick[TK_F_NOW_MHZ]
    f_max = tick[TK_F_MAX_MHZ]
    prompt_tps = tick[TK_PROMPT_TPS]
    waiting = tick[TK_WAITING]
    prompt_ew = state[ST_PROMPT_EW, g]
    finished_ew = state[ST_FINISHED_EW, g]
    per_chunk = obs[OBS_PROMPT_PER_CHUNK, g] > 0.5
    # The queue in time: waiting requests x prompt tokens per request over the prefill capacity
    # at this clock (NaN until both are learned).
    queue_wait_s = math.nan
    if (
        _finite(prefill_k)
        and prefill_k > 0.0
        and finished_ew > 0.0
        and _finite(prompt_ew)
        and waiting >= 0.0
    ):
        queue_wait_s = waiting * (prompt_ew / finished_ew) / (prefill_k * f_now)
    prefill_min = math.nan
    weighted = obs[OBS_PROMPT_WEIGHTED_TOKENS, g]
    wait_s = _PREFILL_WAIT_SHARE * params[PAR_TTFT_SLO_S, g]
    learned = (
        per_chunk
        or state[ST_PREFILL_SAMPLES_S, g] >= _PREFILL_MIN_SAMPLES_S
        or state[ST_TIMED_S, g] >= _TIMED_MIN_S
    )
    if _finite(prefill_k) and prefill_k > 0.0 and _finite(prompt_ew) and learned:
        if weighted > 0.0 and wait_s > 0.0 and prompt_ew > 0.0:
            # Prefill as a first-come queue: at prompt load a and capacity c (tokens/s) a new
            # request waits a*L / (2c(c - a)) on average (Pollaczek-Khinchine), L the prompt
            # mix's E[P^2]/E[P]. The capacity that keeps that wait at wait_s, as a clock.
            load = prompt_ew
            need_tps = 0.5 * (load + math.sqrt(load * load + 2.0 * load * weighted / wait_s))
            prefill_min = need_tps / prefill_k
        else:
            prefill_min = prompt_ew / (prefill_k * _PREFILL_UTIL)
    if obs[OBS_FIRST_TOKEN_BLIND, g] > 0.5:
        # The server exports neither a TTFT histogram nor its prompt mix: first tokens can be
        # neither seen nor modelled, so keep prefill at least this fast.
        blind_min = params[PAR_BLIND_MIN_MHZ, g]
        if not prefill_min >= blind_min:
            prefill_min = blind_min
    state[ST_PREFILL_MIN_MHZ, g] = prefill_min
    # A prompt burst: requests wait while prefill runs near its learned capacity, so their TTFT
    # grows as 1/f. Boost this tick's cap only, to keep the burst at _PREFILL_BURST of the
    # capacity; the chosen clock does not move. Without a queue the burst is absorbed. Where a
    # whole prompt is counted at its first token, a tick's count is work already done.
    boost = -math.inf
    if (
        per_chunk
        and waiting >= 1.0
        and _finite(prefill_k)
        and prefill_k > 0.0
        and prompt_tps > _PREFILL_BURST * prefill_k * f_now
    ):
        boost = min(prompt_tps / (prefill_k * _PREFILL_BURST), f_max)
    return queue_wait_s, prefill_min, boost


@_inline_jit
def _track_power(g: int, state: np.ndarray, tick: np.ndarray) -> None:
    """Smooth group g's per-GPU power and its peak, and the token and energy sums whose ratio is
    its tokens per joule, into state (ST_POWER_W, ST_POWER_PEAK_W, ST_TOKENS_EW, ST_ENERGY_EW,
    ST_TPJ); a tick without a power reading leaves them."""
    interval_s = tick[TK_INTERVAL_S]
    power_gpu_w = tick[TK_POWER_W]
    gen_tps = tick[TK_GEN_TPS]
    gpu_count = tick[TK_GPU_COUNT]
    if _finite(power_gpu_w):
        state[ST_POWER_W, g] = _ewma(
            state[ST_POWER_W, g], power_gpu_w, _alpha_for(_POWER_ALPHA, interval_s)
        )
        peak = state[ST_POWER_PEAK_W, g]
        if not _finite(peak):
            peak = power_gpu_w
        state[ST_POWER_PEAK_W, g] = max(power_gpu_w, peak * _decay_for(_PEAK_DECAY, interval_s))
        if _finite(gen_tps):
            tpj_keep = _decay_for(_TPJ_DECAY, interval_s)
            state[ST_TOKENS_EW, g] = tpj_keep * state[ST_TOKENS_EW, g] + gen_tps * interval_s
            state[ST_ENERGY_EW, g] = (
                tpj_keep * state[ST_ENERGY_EW, g] + power_gpu_w * gpu_count * interval_s
            )
            if state[ST_ENERGY_EW, g] > 0.0:
                state[ST_TPJ, g] = state[ST_TOKENS_EW, g] / state[ST_ENERGY_EW, g]


@_inline_jit
def _learn_latency_map(
    g: int, state: np.ndarray, cells: np.ndarray, tick: np.ndarray
) -> tuple[int, float]:
    """Fit the latency roofline's knee at group g's demand bin (ST_KAPPA), then add the tick's
    ITL to that bin's cells; returns the demand bin (ST_LOAD_BIN) and the knee."""
    interval_s = tick[TK_INTERVAL_S]
    f_max = tick[TK_F_MAX_MHZ]
    floor_mhz = tick[TK_FLOOR_MHZ]
    itl = tick[TK_ITL_S]
    f_itl = tick[TK_ITL_MHZ]
    weight_s = tick[TK_WEIGHT_S]
    demand = state[ST_DEMAND_TPS, g]
    n_load = cells.shape[1]
    n_cbin = cells.shape[2]
    width = (f_max - floor_mhz) / n_cbin
    if width < 1.0:
        width = 1.0
    # Bin on the slower token-rate average where there is one: prefill-heavy ticks dip.
    lb = load_bin(state[ST_GEN_EW, g] if _finite(state[ST_GEN_EW, g]) else demand, n_load)
    state[ST_LOAD_BIN, g] = lb
    cb = int((f_itl - floor_mhz) / width)
    cb = min(max(cb, 0), n_cbin - 1)
    cl = cells[g, lb]
    # The shape is fitted before this tick joins the cells: a load jump within the demand bin
    # must not bend the model the decision below relies on.
    kappa = fit_kappa(cl, floor_mhz, width, f_max)
    state[ST_KAPPA, g] = kappa
    cell_keep = _decay_for(_CELL_DECAY, interval_s)
    for c in range(n_cbin):
        cl[c, CELL_W_ITL] *= cell_keep
        cl[c, CELL_ITL_SUM] *= cell_keep
    if _finite(itl):
        cl[cb, CELL_W_ITL] += weight_s
        cl[cb, CELL_ITL_SUM] += weight_s * itl
    return lb, kappa


@_inline_jit
def _shift_clock_history(g: int, state: np.ndarray, tick: np.ndarray) -> float:
    """Add the tick's allowed clock to group g's clock history (ST_CLOCK_HISTORY, by whole
    seconds) and return the highest clock allowed over it, this tick included."""
    interval_s = tick[TK_INTERVAL_S]
    f_now = tick[TK_F_NOW_MHZ]
    prev_cap = tick[TK_PREV_CAP_MHZ]
    # The cap counts, not only the clock reached: a GPU below an unlocked cap was held by its
    # power limit, and a miss then says nothing about the clock.
    allowed = max(f_now, prev_cap) if _finite(prev_cap) else f_now
    bucket = state[ST_CLOCK_BUCKET_MHZ, g]
    bucket = max(bucket, allowed) if _finite(bucket) else allowed
    recent = bucket
    for r in range(ST_CLOCK_HISTORY, ST_CLOCK_HISTORY + _CLOCK_HISTORY_BUCKETS):
        if _finite(state[r, g]):
            recent = max(recent, state[r, g])
    # By whole seconds, to the nearest tick; a tick of several seconds fills several.
    bucket_s = state[ST_CLOCK_BUCKET_S, g] + interval_s
    shifts = 0
    while bucket_s >= 0.5 and shifts < _CLOCK_HISTORY_BUCKETS:
        for r in range(ST_CLOCK_HISTORY + _CLOCK_HISTORY_BUCKETS - 1, ST_CLOCK_HISTORY, -1):
            state[r, g] = state[r - 1, g]
        state[ST_CLOCK_HISTORY, g] = bucket
        bucket_s -= 1.0
        shifts += 1
    if shifts > 0:
        bucket = math.nan
        if bucket_s >= 0.5:
            bucket_s = 0.0
    state[ST_CLOCK_BUCKET_MHZ, g] = bucket
    state[ST_CLOCK_BUCKET_S, g] = bucket_s
    return recent


@_inline_jit
def _slo_missed(g: int, params: np.ndarray, state: np.ndarray, tick: np.ndarray) -> bool:
    """Whether group g's tick missed an SLO: its own ITL past the SLO while the smoothed one is,
    a first token past the TTFT SLO, a queue past max_waiting or a preemption."""
    itl = tick[TK_ITL_S]
    itl_s = state[ST_ITL_S, g]
    ttft = tick[TK_TTFT_S]
    itl_slo = params[PAR_ITL_SLO_S, g]
    ttft_slo = params[PAR_TTFT_SLO_S, g]
    itl_hard = _finite(itl) and itl_s > itl_slo
    queue_over = tick[TK_WAITING] > params[PAR_MAX_WAITING, g]
    preempted = tick[TK_PREEMPTED] > 0.5
    # Only real SLO misses mark a clock unsafe; the margin line is crossed by noise near the
    # optimum.
    # A smoothed latency stays past the SLO for a few ticks after the raise that answered it:
    # only a tick whose own signal misses blames the clock. A first token past the SLO is a
    # miss on its own (the slowest bucket's mean is past it, so at least one request was).
    return (itl_hard and itl > itl_slo) or ttft > ttft_slo or queue_over or preempted


@_inline_jit
def _learn_power_model(
    g: int,
    obs: np.ndarray,
    state: np.ndarray,
    efit: np.ndarray,
    chol: np.ndarray,
    fit: np.ndarray,
    tick: np.ndarray,
) -> float:
    """Add the tick to group g's power model (efit[g]), fit it into fit and return its clock of
    least power between the floor and f_max (ST_ENERGY_OPT_MHZ unclamped; NaN: none)."""
    interval_s = tick[TK_INTERVAL_S]
    f_max = tick[TK_F_MAX_MHZ]
    floor_mhz = tick[TK_FLOOR_MHZ]
    f_now = tick[TK_F_NOW_MHZ]
    power_gpu_w = tick[TK_POWER_W]
    gen_tps = tick[TK_GEN_TPS]
    prompt_tps = tick[TK_PROMPT_TPS]
    weight_s = tick[TK_WEIGHT_S]
    # While a lowered power cap holds the clock, power is the cap's, not the clock's: such
    # ticks (whole load phases under a budget or an operator's cap) taught the fit that lower
    # clocks draw more, and descents stopped for good.
    held_by_cap = obs[OBS_LOWERED_CAP, g] > 0.5
    if _finite(power_gpu_w) and _finite(gen_tps) and not held_by_cap:
        ef = efit[g]
        efit_keep = _decay_for(_EFIT_DECAY, interval_s)
        for k in range(N_EFIT):
            ef[k] *= efit_keep
        # Units keep the normal matrix well conditioned: ktok/s, GHz below f_max, W/100.
        phi = fit[FIT_WORK : FIT_WORK + EFIT_N]
        phi[0] = 1.0
        phi[1] = gen_tps / 1000.0
        phi[2] = prompt_tps / 1000.0
        phi[EFIT_X] = (f_now - f_max) / 1000.0
        phi[EFIT_XX] = phi[EFIT_X] * phi[EFIT_X]
        y = power_gpu_w / 100.0
        for i in range(EFIT_N):
            for j in range(EFIT_N):
                ef[i * EFIT_N + j] += weight_s * phi[i] * phi[j]
            ef[EFIT_B + i] += weight_s * phi[i] * y
        ef[EFIT_YY] += weight_s * y * y
        ef[EFIT_W] += weight_s
    power_fit(efit[g], chol, fit, interval_s)
    energy_opt = power_vertex_mhz(fit, f_max)
    state[ST_ENERGY_OPT_MHZ, g] = energy_opt
    if not (energy_opt >= floor_mhz and energy_opt <= f_max):
        energy_opt = math.nan
    return energy_opt


@_inline_jit
def _slo_min_mhz(
    g: int, params: np.ndarray, state: np.ndarray, tick: np.ndarray, kappa: float
) -> tuple[float, float]:
    """The lowest clock meeting group g's latency lines with the lowering band (ST_SLO_MIN_MHZ
    the same, at most f_max), from the learned roofline and 1/f prefill, and the part of it the
    slowest recent first token needs (NaN: none)."""
    f_max = tick[TK_F_MAX_MHZ]
    f_now = tick[TK_F_NOW_MHZ]
    f_itl = tick[TK_ITL_MHZ]
    itl_line = tick[TK_ITL_LINE_S]
    ttft_line = tick[TK_TTFT_LINE_S]
    itl_ref = tick[TK_ITL_REF_S]
    ttft_ref = tick[TK_TTFT_REF_S]
    ttft_work = state[ST_TTFT_WORK, g]
    ttft_slo = params[PAR_TTFT_SLO_S, g]
    slo_min = tick[TK_FLOOR_MHZ]
    if _finite(itl_ref):
        slo_min = max(
            slo_min, roofline_inverse(kappa, f_max, f_itl, itl_ref, itl_line * (1 - _LOWER_BAND))
        )
    if _finite(ttft_ref):
        slo_min = max(slo_min, f_now * ttft_ref / (ttft_line * (1 - _LOWER_BAND)))
    ttft_min = math.nan
    if _finite(ttft_work) and ttft_slo > 0.0:
        ttft_min = ttft_work / (_TTFT_WORK_AIM * ttft_slo)
        slo_min = max(slo_min, ttft_min)
    state[ST_SLO_MIN_MHZ, g] = min(slo_min, f_max) if _finite(slo_min) else f_max
    return slo_min, ttft_min


@_inline_jit
def _descent_allowance(
    g: int, knobs: np.ndarray, state: np.ndarray, tick: np.ndarray
) -> tuple[float, float, float]:
    """Group g's seconds of descent this tick, the seconds that count as a full one, and the MHz
    the base may descend by them (max_step_down at most)."""
    interval_s = tick[TK_INTERVAL_S]
    step_down = knobs[KNOB_STEP_DOWN_MHZ]
    # Seconds of descent: the tick's, and the rest of a second that a short tick's clock steps
    # did not take.
    descent_full_s = max(interval_s, 1.0)
    descent_s = min(state[ST_DESCENT_S, g] + interval_s, descent_full_s)
    if not descent_s >= 0.0:
        descent_s = interval_s
    # A real loop's tick is a few ms either side of its interval: one just short of a second
    # (or of a longer configured tick) takes the full one's steps, not a step fewer after
    # rounding to the clock table.
    nominal_s = knobs[KNOB_INTERVAL_S]
    nominal_s = max(nominal_s, 1.0) if _finite(nominal_s) else 1.0
    if _DESCENT_JITTER * nominal_s <= descent_s < nominal_s:
        descent_s = nominal_s
        descent_full_s = max(descent_full_s, nominal_s)
    descent_rate = _DESCENT_STEPS_PER_S * tick[TK_CLOCK_STEP_MHZ]
    descent = min(step_down, descent_rate * descent_s)
    return descent_s, descent_full_s, descent


@_inline_jit
def _guard_raise(
    g: int,
    params: np.ndarray,
    state: np.ndarray,
    tick: np.ndarray,
    base: float,
    kappa: float,
    ttft_min: float,
    queue_wait_s: float,
) -> tuple[float, int, float, bool]:
    """Guards: the clock to raise group g's base to within this tick (-inf: none), the reason,
    the seconds to hold it, and whether the raise is a one-step nudge for a one-tick spike."""
    f_max = tick[TK_F_MAX_MHZ]
    f_now = tick[TK_F_NOW_MHZ]
    f_itl = tick[TK_ITL_MHZ]
    clock_step = tick[TK_CLOCK_STEP_MHZ]
    itl_line = tick[TK_ITL_LINE_S]
    ttft_line = tick[TK_TTFT_LINE_S]
    itl = tick[TK_ITL_S]
    itl_q = tick[TK_ITL_Q_S]
    ttft = tick[TK_TTFT_S]
    waiting = tick[TK_WAITING]
    waiting_prev = tick[TK_WAITING_PREV]
    kv_usage = tick[TK_KV_USAGE]
    preempted = tick[TK_PREEMPTED] > 0.5
    itl_s = state[ST_ITL_S, g]
    ttft_s = state[ST_TTFT_S, g]
    queue_trend = state[ST_QUEUE_TREND, g]
    itl_slo = params[PAR_ITL_SLO_S, g]
    ttft_slo = params[PAR_TTFT_SLO_S, g]
    max_waiting = params[PAR_MAX_WAITING, g]
    kv_full = kv_usage >= _KV_FULL
    # Smoothed latencies decide. One tick's quantile comes from few requests and coarse histogram
    # buckets; past the SLO it nudges the clock up, no more.
    itl_hard = _finite(itl) and itl_s > itl_slo
    itl_high = _finite(itl) and itl_s > itl_line
    ttft_hard = _finite(ttft) and ttft_s > ttft_slo
    ttft_high = _finite(ttft) and ttft_s > ttft_line
    spike_itl = itl_q > itl_slo or itl > itl_slo
    spike_ttft = ttft > ttft_slo
    queue_over = waiting > max_waiting
    # A queue that keeps growing means the clock is below what the demand needs.
    queue_growing = (
        waiting >= max(2.0, _QUEUE_MIN * max_waiting)
        and _finite(waiting_prev)
        and waiting > waiting_prev
        and queue_trend >= _QUEUE_TREND
    )
    raise_to = -math.inf
    raise_reason = REASON_STEADY
    raise_hold = 0.0
    if preempted or queue_over:
        raise_to = f_max
        raise_reason = REASON_RAISE_KV if preempted else REASON_RAISE_QUEUE
        raise_hold = _HOLD_QUEUE_S
    elif queue_growing:
        # In proportion to how full the queue is against the guard: bursts of a few requests
        # are routine, a queue near the guard is nearly a miss.
        raise_to = f_now + min(1.0, waiting / max(max_waiting, 1.0)) * (f_max - f_now)
        raise_reason = REASON_RAISE_QUEUE
        raise_hold = _HOLD_QUEUE_GROWING_S
    if kv_full:
        # In proportion to how close to full, at least a clock step a tick: faster decode
        # finishes requests sooner, and the cache drains as they finish.
        share = min(1.0, (kv_usage - _KV_FULL) / (1.0 - _KV_FULL))
        f_req = f_now + share * (f_max - f_now)
        if f_req > raise_to:
            raise_to = f_req
            raise_reason = REASON_RAISE_KV
            raise_hold = max(raise_hold, _HOLD_QUEUE_GROWING_S)
    wait_budget_s = _QUEUE_WAIT_SHARE * ttft_slo
    if queue_wait_s > wait_budget_s:
        # Prefill is compute-bound: the clock that drains this queue within the budget.
        f_req = f_now * queue_wait_s / wait_budget_s
        if f_req > raise_to:
            raise_to = f_req
            raise_reason = REASON_RAISE_QUEUE
            raise_hold = max(raise_hold, _HOLD_QUEUE_GROWING_S)
    if itl_hard:
        # A miss: at least halfway to f_max, further if the roofline says so.
        f_req = max(
            f_now + 0.5 * (f_max - f_now),
            roofline_inverse(kappa, f_max, f_itl, itl_s, _MISS_AIM * itl_line),
        )
        if f_req > raise_to:
            raise_to = f_req
            raise_reason = REASON_RAISE_ITL
        raise_hold = max(raise_hold, _HOLD_RAISE_S)
    elif itl_high:
        # Over the margin line: remove the excess, no more.
        f_req = roofline_inverse(kappa, f_max, f_itl, itl_s, itl_line)
        if f_req > raise_to:
            raise_to = f_req
            raise_reason = REASON_RAISE_ITL
        raise_hold = max(raise_hold, _HOLD_RAISE_S)
    if ttft_hard:
        raise_to = f_max
        raise_reason = REASON_RAISE_TTFT
        raise_hold = max(raise_hold, _HOLD_RAISE_S)
    elif ttft_high:
        # Prefill is compute-bound: TTFT scales as 1/f (dvfs_plant_model section 4).
        f_req = f_now * ttft_s / ttft_line
        if f_req > raise_to:
            raise_to = f_req
            raise_reason = REASON_RAISE_TTFT
        raise_hold = max(raise_hold, _HOLD_RAISE_S)
    nudge = False
    if raise_to == -math.inf and spike_ttft and ttft_min > max(base, f_now):
        # A first token came late: the clock that would have served it in time, at once.
        raise_to = ttft_min
        raise_reason = REASON_RAISE_TTFT
    if raise_to == -math.inf and (spike_itl or spike_ttft):
        # One clock step: the tail is partly the clock's (prefill stalls scale as 1/f), and
        # requests' averages say the rest is fine.
        raise_to = max(base, f_now) + clock_step
        raise_reason = REASON_RAISE_ITL if spike_itl else REASON_RAISE_TTFT
        nudge = True
    return raise_to, raise_reason, raise_hold, nudge


@_inline_jit
def _descent_bound_mhz(
    tick: np.ndarray,
    base: float,
    slo_min: float,
    energy_opt: float,
    safe_mhz: float,
    prefill_min: float,
) -> float:
    """The lowest clock a descent from base may reach: the floor, the latency bound, the energy
    optimum (the base where that is higher), the learned safe clock and the prefill-headroom
    bound, whichever is highest (NaN bounds do not count)."""
    bound = max(tick[TK_FLOOR_MHZ], slo_min)
    if _finite(energy_opt):
        bound = max(bound, min(energy_opt, base))
    bound = max(bound, safe_mhz)
    if _finite(prefill_min):
        bound = max(bound, prefill_min)
    return bound


@_inline_jit
def _has_slack(g: int, params: np.ndarray, tick: np.ndarray) -> bool:
    """Whether group g's latencies and queue leave room to lower its clock."""
    itl = tick[TK_ITL_S]
    itl_ref = tick[TK_ITL_REF_S]
    itl_line = tick[TK_ITL_LINE_S]
    ttft = tick[TK_TTFT_S]
    ttft_ref = tick[TK_TTFT_REF_S]
    ttft_line = tick[TK_TTFT_LINE_S]
    running = tick[TK_RUNNING]
    waiting = tick[TK_WAITING]
    waiting_prev = tick[TK_WAITING_PREV]
    max_waiting = params[PAR_MAX_WAITING, g]
    slack = True
    if _finite(itl_ref):
        slack = itl_ref <= itl_line * (1 - _LOWER_BAND) and itl <= itl_line
    elif running > 0.5 or not _finite(running):
        # Requests in flight and no latency seen, or no signal at all (a server that could
        # not be read, until it turns stale): no evidence of slack.
        slack = False
    if _finite(ttft_ref) and (ttft_ref > ttft_line * (1 - _LOWER_BAND) or ttft > ttft_line):
        slack = False
    if waiting > _QUEUE_SLACK * max_waiting or (
        waiting > 0.0 and _finite(waiting_prev) and waiting > waiting_prev
    ):
        slack = False
    return slack


@_inline_jit
def _descend(
    g: int,
    params: np.ndarray,
    knobs: np.ndarray,
    state: np.ndarray,
    fit: np.ndarray,
    tick: np.ndarray,
    row: np.ndarray,
    n: int,
    base: float,
    slope_t: float,
    bound: float,
    energy_opt: float,
    descent_s: float,
    descent_full_s: float,
    descent: float,
) -> tuple[float, int, float]:
    """Without a raise or a hold: group g's new base (a clock step up on the left side of the U,
    down with slack towards bound) and reason, and the descent allowed (faster back down from a
    raise)."""
    f_max = tick[TK_F_MAX_MHZ]
    clock_step = tick[TK_CLOCK_STEP_MHZ]
    step_down = knobs[KNOB_STEP_DOWN_MHZ]
    reason = REASON_STEADY
    new_base = base
    if base < f_max and (
        slope_t < _ENERGY_RAISE_T or (_finite(energy_opt) and base < energy_opt - clock_step)
    ):
        new_base = min(f_max, clamp_clock_up(row, n, base + clock_step))
        reason = REASON_ENERGY
    elif _has_slack(g, params, tick):
        # Back down from a raise for a burst that has passed, the descent is geometric:
        # the clock held before it served this load.
        raised_from = state[ST_RAISED_FROM_MHZ, g]
        if _finite(raised_from) and base > raised_from:
            gap = base - max(bound, raised_from)
            share = _alpha_for(_DESCENT_SHARE, descent_s)
            descent = min(step_down, max(descent, share * gap))
        f_next = clamp_clock_up(row, n, max(base - descent, bound))
        if f_next >= base and descent_s >= descent_full_s:
            # A clock table coarser than the slew limit: one supported step at a time.
            below = clamp_clock_down(row, n, base - 1.0)
            if below < base and below >= bound:
                f_next = below
        if f_next < base:
            # Left side of the U: power would rise again below here.
            if power_slope_at(fit, f_next, f_max)[1] < _ENERGY_BLOCK_T:
                reason = REASON_ENERGY_FLOOR
            else:
                new_base = f_next
                reason = REASON_LOWER
    return new_base, reason, descent


@_inline_jit
def _target_cap(
    g: int,
    knobs: np.ndarray,
    state: np.ndarray,
    out: np.ndarray,
    tick: np.ndarray,
    row: np.ndarray,
    n: int,
    mode: int,
    new_base: float,
    reason: int,
    descent: float,
) -> tuple[float, int]:
    """The cap group g's mode asks for before the dither (in target mode the clock the tokens per
    joule target settles at, ST_TARGET_MHZ; else the base) and the reason; writes
    out[OUT_TARGET_REACHED] in target mode."""
    if mode != MODE_TARGET:
        # A switch to target mode (a reload) starts its search from the clock held now.
        state[ST_TARGET_MHZ, g] = new_base
        return new_base, reason
    f_max = tick[TK_F_MAX_MHZ]
    clock_step = tick[TK_CLOCK_STEP_MHZ]
    interval_s = tick[TK_INTERVAL_S]
    target_tpj = knobs[KNOB_TARGET_TPJ]
    tgt = state[ST_TARGET_MHZ, g]
    if not _finite(tgt):
        tgt = f_max
    tpj = state[ST_TPJ, g]
    if _finite(tpj) and _finite(target_tpj) and reason != REASON_HOLD:
        if tpj < target_tpj:
            gap = (target_tpj - tpj) / target_tpj
            tgt -= min(descent, max(clock_step, gap * f_max) * interval_s)
        elif tpj > target_tpj * (1.0 + _TARGET_BAND):
            tgt += clock_step * interval_s
        out[OUT_TARGET_REACHED, g] = 1.0 if tpj >= target_tpj * (1.0 - _TARGET_TOL) else 0.0
    tgt = min(max(tgt, new_base), f_max)
    state[ST_TARGET_MHZ, g] = tgt
    cap_base = clamp_clock_down(row, n, tgt)
    if cap_base > new_base and reason == REASON_STEADY:
        reason = REASON_TARGET
    return cap_base, reason


@_inline_jit
def _dither_and_slew(
    g: int,
    knobs: np.ndarray,
    state: np.ndarray,
    tick: np.ndarray,
    row: np.ndarray,
    n: int,
    cap_base: float,
    reason: int,
    kappa: float,
    safe_mhz: float,
    prefill_min: float,
    descent: float,
) -> float:
    """Group g's cap: cap_base dithered when settled, a supported clock, and lowered from the
    last cap by the descent allowed at most."""
    f_max = tick[TK_F_MAX_MHZ]
    floor_mhz = tick[TK_FLOOR_MHZ]
    interval_s = tick[TK_INTERVAL_S]
    now_s = tick[TK_NOW_S]
    prev_cap = tick[TK_PREV_CAP_MHZ]
    f_itl = tick[TK_ITL_MHZ]
    itl_ref = tick[TK_ITL_REF_S]
    itl_line = tick[TK_ITL_LINE_S]
    running = tick[TK_RUNNING]
    dither = knobs[KNOB_DITHER_MHZ]
    # A small regular dither keeps the clock models identifiable; only when settled and slack.
    cap = cap_base
    if (
        dither > 0.0
        and reason in (REASON_STEADY, REASON_ENERGY_FLOOR)
        and state[ST_SETTLED_S, g] >= _DITHER_SETTLED_S - 0.5 * interval_s
        and state[ST_PRESSURE, g] < 0.5
    ):
        # Up and down every _DITHER_HALF_PERIOD_S, or every tick when ticks are longer.
        half_period_s = max(_DITHER_HALF_PERIOD_S, interval_s)
        if math.floor(now_s / half_period_s + 0.5) % 2 == 0:
            # Rounded towards the base: a coarse clock table gets no dither rather than a big one.
            cap = clamp_clock_down(row, n, min(f_max, cap_base + dither))
        elif (not _finite(itl_ref) and running <= 0.5) or (
            _finite(itl_ref)
            and roofline_ratio(kappa, f_max, cap_base - dither, f_itl) * itl_ref
            <= itl_line * (1 - 0.5 * _LOWER_BAND)
        ):
            low = max(floor_mhz, safe_mhz, cap_base - dither)
            if _finite(prefill_min):
                low = max(low, min(prefill_min, cap_base))
            cap = clamp_clock_up(row, n, low)
    # Slew limit on the way down; up is immediate.
    cap = clamp_clock_down(row, n, cap)
    lowest = clamp_clock_up(row, n, prev_cap - descent)
    if lowest >= prev_cap:
        lowest = clamp_clock_down(row, n, prev_cap - 1.0)
    if cap < lowest:
        cap = lowest
    return min(cap, f_max)


@_inline_jit
def _tracked_limit_mw(
    g: int, params: np.ndarray, knobs: np.ndarray, state: np.ndarray, mode: int, boosted: bool
) -> float:
    """Group g's power limit in mW tracking its power peak, where the knob asks for one outside
    budget mode and nothing presses; NaN (the default limit) otherwise."""
    limit = math.nan
    if knobs[KNOB_TRACK_LIMIT] > 0.5 and mode != MODE_BUDGET:
        peak = state[ST_POWER_PEAK_W, g]
        # A prefill burst draws near the default limit: a boosted tick has no tracked limit.
        if _finite(peak) and state[ST_PRESSURE, g] < 0.5 and not boosted:
            limit = peak * _LIMIT_HEADROOM + _LIMIT_HEADROOM_W
            limit = min(max(limit * 1000.0, params[PAR_PL_MIN_MW, g]), params[PAR_PL_MAX_MW, g])
            limit = math.floor(limit)
    return limit


@jit
def _group_step(
    g: int,
    obs: np.ndarray,
    params: np.ndarray,
    clocks: np.ndarray,
    n_clocks: np.ndarray,
    knobs: np.ndarray,
    state: np.ndarray,
    efit: np.ndarray,
    cells: np.ndarray,
    misses: np.ndarray,
    out: np.ndarray,
    chol: np.ndarray,
    fit: np.ndarray,
    tick: np.ndarray,
) -> None:
    """One tick of group g: sense, learn, guard or descend, then the mode, dither and slew."""
    mode = int(knobs[KNOB_MODE])
    margin = knobs[KNOB_SLO_MARGIN]
    row = clocks[g]
    n = int(n_clocks[g])
    f_max = params[PAR_CLOCK_MAX_MHZ, g]
    floor_mhz = min(params[PAR_FLOOR_MHZ, g], f_max)
    if state[ST_READY, g] < 0.5:
        _reset_group(g, f_max, state)
    interval_s = _tick_interval_s(obs[OBS_INTERVAL_S, g], knobs[KNOB_INTERVAL_S])
    now_s = state[ST_TIME_S, g] + interval_s
    state[ST_TIME_S, g] = now_s
    out[OUT_TARGET_REACHED, g] = math.nan
    prev_cap = state[ST_CAP_MHZ, g]
    clock_step = f_max - clamp_clock_down(row, n, f_max - 1.0)
    if not clock_step > 0.0:
        clock_step = 15.0

    if obs[OBS_STALE, g] > 0.5:
        _hold_at_f_max(g, f_max, mode, REASON_STALE, state, out)
        # Unlike off mode, which decides as usual and overrides only the result, a stale tick
        # decided nothing: the base starts settling again and the group counts as pressed.
        state[ST_SETTLED_S, g] = 0.0
        state[ST_PRESSURE, g] = 1.0
        return

    tick[TK_INTERVAL_S] = interval_s
    tick[TK_NOW_S] = now_s
    tick[TK_F_MAX_MHZ] = f_max
    tick[TK_FLOOR_MHZ] = floor_mhz
    tick[TK_CLOCK_STEP_MHZ] = clock_step
    tick[TK_PREV_CAP_MHZ] = prev_cap
    tick[TK_ITL_LINE_S] = margin * params[PAR_ITL_SLO_S, g]
    tick[TK_TTFT_LINE_S] = margin * params[PAR_TTFT_SLO_S, g]

    # Sense.
    _sense(g, obs, tick)
    _smooth_load(g, obs, state, tick)
    _estimate_latency(g, state, tick)
    prefill_k = _learn_prefill_capacity(g, obs, state, tick)
    queue_wait_s, prefill_min, boost = _prefill_bounds(g, obs, params, state, tick, prefill_k)
    _track_power(g, state, tick)

    # Learn: latency per (demand bin, clock bin); the clocks blamed for misses; the power model.
    lb, kappa = _learn_latency_map(g, state, cells, tick)
    # Latency and queue signals lag the clock by a few seconds: blame the highest recent clock.
    recent = _shift_clock_history(g, state, tick)
    # A miss at f_max says nothing about the clock (the load alone did it).
    if _slo_missed(g, params, state, tick) and recent < f_max - clock_step:
        record_miss(misses[g, lb], recent, now_s, interval_s)
    safe_mhz = learned_safe_mhz(misses[g], lb, clock_step, now_s)
    state[ST_SAFE_MHZ, g] = safe_mhz
    energy_opt = _learn_power_model(g, obs, state, efit, chol, fit, tick)
    slo_min, ttft_min = _slo_min_mhz(g, params, state, tick, kappa)

    # Decide: raise at once, hold, or lower with slack.
    base = state[ST_BASE_MHZ, g]
    if not _finite(base):
        base = f_max
    base = min(max(base, floor_mhz), f_max)
    hold = state[ST_HOLD_S, g]
    # Holds end at the tick nearest their end.
    if hold <= 0.5 * interval_s:
        hold = 0.0
    reason = REASON_STEADY
    new_base = base
    descent_s, descent_full_s, descent = _descent_allowance(g, knobs, state, tick)
    slope, slope_t = power_slope_at(fit, base, f_max)
    state[ST_SLOPE_W_PER_MHZ, g] = slope
    state[ST_SLOPE_T, g] = slope_t
    raise_to, raise_reason, raise_hold, nudge = _guard_raise(
        g, params, state, tick, base, kappa, ttft_min, queue_wait_s
    )
    if raise_to > -math.inf:
        if not nudge:
            # Never to a clock that recently missed the SLO at this load.
            raise_to = max(raise_to, safe_mhz)
        raise_to = max(raise_to, max(base, tick[TK_F_NOW_MHZ]) + clock_step)
        raise_to = min(raise_to, f_max)
        new_base = max(base, clamp_clock_up(row, n, raise_to))
        hold = max(hold, raise_hold)
        reason = raise_reason
    elif hold > 0.0:
        hold = max(hold - interval_s, 0.0)
        reason = REASON_HOLD
    else:
        bound = _descent_bound_mhz(tick, base, slo_min, energy_opt, safe_mhz, prefill_min)
        new_base, reason, descent = _descend(
            g,
            params,
            knobs,
            state,
            fit,
            tick,
            row,
            n,
            base,
            slope_t,
            bound,
            energy_opt,
            descent_s,
            descent_full_s,
            descent,
        )
    state[ST_HOLD_S, g] = hold
    state[ST_PRESSURE, g] = 1.0 if (raise_to > -math.inf or hold > 0.5 * interval_s) else 0.0
    if new_base < base:
        descent_rate = _DESCENT_STEPS_PER_S * clock_step
        descent_s = max(descent_s - (base - new_base) / descent_rate, 0.0)
    state[ST_DESCENT_S, g] = descent_s
    if new_base > base and not _finite(state[ST_RAISED_FROM_MHZ, g]):
        state[ST_RAISED_FROM_MHZ, g] = base
    elif new_base <= state[ST_RAISED_FROM_MHZ, g]:
        state[ST_RAISED_FROM_MHZ, g] = math.nan
    if new_base == base:
        state[ST_SETTLED_S, g] += interval_s
    else:
        state[ST_SETTLED_S, g] = 0.0
    state[ST_BASE_MHZ, g] = new_base

    # Act: the mode, the dither and the slew limit, a prompt burst's boost, the power limit.
    if mode == MODE_OFF:
        _hold_at_f_max(g, f_max, mode, REASON_OFF, state, out)
        return
    cap_base, reason = _target_cap(
        g, knobs, state, out, tick, row, n, mode, new_base, reason, descent
    )
    cap = _dither_and_slew(
        g, knobs, state, tick, row, n, cap_base, reason, kappa, safe_mhz, prefill_min, descent
    )
    # The slew limit applies to the chosen cap, not to a burst's one-tick boost.
    state[ST_CAP_MHZ, g] = cap
    boosted = boost > cap
    if boosted:
        cap = clamp_clock_up(row, n, boost)
        if reason in (REASON_STEADY, REASON_LOWER, REASON_ENERGY_FLOOR, REASON_HOLD):
            reason = REASON_RAISE_TTFT
    out[OUT_CAP_MHZ, g] = cap
    out[OUT_REASON, g] = reason
    limit = _tracked_limit_mw(g, params, knobs, state, mode, boosted)
    state[ST_LIMIT_MW, g] = limit
    out[OUT_LIMIT_MW, g] = limit


@jit
def controller_step(
    obs: np.ndarray,
    params: np.ndarray,
    clocks: np.ndarray,
    n_clocks: np.ndarray,
    knobs: np.ndarray,
    state: np.ndarray,
    efit: np.ndarray,
    cells: np.ndarray,
    misses: np.ndarray,
    out: np.ndarray,
) -> bool:
    """One control tick for every group: estimate -> decide -> clamp.

    Updates state, efit, cells and misses in place and writes out. Returns False only in budget
    mode when the per-GPU minimum limits alone exceed the node budget (all groups then sit at the
    minimum).
    """
    n_groups = obs.shape[1]
    chol = np.zeros((EFIT_N, EFIT_N))
    fit = np.zeros(N_FIT)
    tick = np.zeros(N_TK)
    for g in range(n_groups):
        _group_step(
            g,
            obs,
            params,
            clocks,
            n_clocks,
            knobs,
            state,
            efit,
            cells,
            misses,
            out,
            chol,
            fit,
            tick,
        )
    if int(knobs[KNOB_MODE]) != MODE_BUDGET:
        return True
    gpu_count = np.empty(n_groups)
    need = np.empty(n_groups)
    fixed = np.empty(n_groups)
    weight = np.empty(n_groups)
    limit = np.empty(n_groups)
    tpj_sum = 0.0
    tpj_n = 0
    for g in range(n_groups):
        tpj = state[ST_TPJ, g]
        if _finite(tpj) and tpj > 0.0:
            tpj_sum += tpj
            tpj_n += 1
    tpj_mean = tpj_sum / tpj_n if tpj_n > 0 else math.nan
    budget_mw = knobs[KNOB_BUDGET_W] * 1000.0
    node_gpus = 0.0
    for g in range(n_groups):
        # The GPUs whose limit powerd can set share the budget; the daemon keeps the others'
        # limits out of it (NaN: all of the group's).
        count = obs[OBS_LIMITED_GPUS, g]
        if not _finite(count):
            count = obs[OBS_GPU_COUNT, g]
        gpu_count[g] = count if count >= 1.0 else 1.0
        if count >= 1.0:
            node_gpus += gpu_count[g]
    node_gpus = max(node_gpus, 1.0)
    stale_mw = 0.0
    others_min_mw = 0.0
    for g in range(n_groups):
        fixed[g] = math.nan
        if _finite(obs[OBS_LIMITED_GPUS, g]) and obs[OBS_LIMITED_GPUS, g] < 0.5:
            fixed[g] = 0.0  # no limit of the group can be set: it holds no share
        elif obs[OBS_STALE, g] > 0.5:
            # Default clocks, but not the default limit: the budget guards a circuit, and a
            # server that stops answering has not stopped drawing. It keeps its last share, up
            # to an even one (its need is unknown; a budget cut shrinks it with the rest).
            held = state[ST_LIMIT_MW, g]
            even = budget_mw / node_gpus
            if not _finite(held) or held > even:
                held = even
            fixed[g] = math.floor(
                min(max(held, params[PAR_PL_MIN_MW, g]), params[PAR_PL_MAX_MW, g])
            )
            stale_mw += fixed[g] * gpu_count[g]
        else:
            others_min_mw += params[PAR_PL_MIN_MW, g] * gpu_count[g]
        if state[ST_PRESSURE, g] > 0.5:
            need[g] = params[PAR_PL_MAX_MW, g]
        else:
            p = state[ST_POWER_W, g]
            if _finite(p):
                need[g] = (p * _BUDGET_NEED_HEADROOM + _BUDGET_NEED_W) * 1000.0
            else:
                need[g] = params[PAR_PL_DEFAULT_MW, g]
        # Marginal tokens per watt: the more efficient group gets more of a short budget.
        tpj = state[ST_TPJ, g]
        if _finite(tpj_mean) and _finite(tpj) and tpj > 0.0:
            weight[g] = min(max(tpj / tpj_mean, 0.5), 2.0)
        else:
            weight[g] = 1.0
    # Where the other groups' minimum limits (GPUs of a model with higher ones) leave less than
    # the stale shares, those shrink, down to their own minimum.
    room_mw = budget_mw - others_min_mw
    if stale_mw > room_mw and stale_mw > 0.0:
        scale = max(room_mw, 0.0) / stale_mw
        for g in range(n_groups):
            if obs[OBS_STALE, g] > 0.5 and fixed[g] > 0.0:
                fixed[g] = math.floor(max(fixed[g] * scale, params[PAR_PL_MIN_MW, g]))
    ok = allocate_budget(
        budget_mw,
        gpu_count,
        params[PAR_PL_MIN_MW],
        params[PAR_PL_MAX_MW],
        need,
        fixed,
        weight,
        limit,
    )
    for g in range(n_groups):
        out[OUT_LIMIT_MW, g] = limit[g] if limit[g] > 0.0 else math.nan
        state[ST_LIMIT_MW, g] = out[OUT_LIMIT_MW, g]
    return ok


@jit
def prefill_guard(
    backlog_tokens: np.ndarray,
    params: np.ndarray,
    clocks: np.ndarray,
    n_clocks: np.ndarray,
    state: np.ndarray,
    out: np.ndarray,
    raise_mhz: np.ndarray,
) -> None:
    """At or between ticks: per group, the supported clock cap that prefills backlog_tokens[g]
    (prompt tokens the server still has to prefill; NaN: unknown) within _GUARD_TTFT_SHARE of
    the TTFT SLO at the learned prefill capacity, f_max at most, when that is above the cap the
    last tick emitted. Writes it to raise_mhz[g], NaN where the cap stands; reads the rest."""
    for g in range(backlog_tokens.shape[0]):
        raise_mhz[g] = math.nan
        backlog = backlog_tokens[g]
        prefill_k = state[ST_PREFILL_K, g]
        cap = out[OUT_CAP_MHZ, g]
        budget_s = _GUARD_TTFT_SHARE * params[PAR_TTFT_SLO_S, g]
        f_max = params[PAR_CLOCK_MAX_MHZ, g]
        if not (
            state[ST_READY, g] > 0.5
            and backlog > 0.0
            and prefill_k > 0.0
            and budget_s > 0.0
            and cap < f_max
        ):
            continue
        # Prefill is compute-bound: its rate is the learned capacity per MHz times the clock.
        need = min(backlog / (prefill_k * budget_s), f_max)
        if need > cap:
            raise_mhz[g] = clamp_clock_up(clocks[g], n_clocks[g], need)
