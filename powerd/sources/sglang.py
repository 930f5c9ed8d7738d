"""SGLang (`--enable-metrics`, `python/sglang/srt/metrics/collector.py`).

Token figures, best first:
1. `sglang:realtime_tokens_total{mode="decode"}` (newer builds; the scheduler adds to it every
   log interval): a counter, rated like any other. Prompt tokens are `mode="prefill_compute"`,
   the prefill work actually computed (prefix-cache hits are `prefill_cache` and cost nothing).
2. `sglang:gen_throughput`: a gauge in tokens/s that each scheduler recomputes every
   `decode_log_interval` (40) decode steps. It keeps its last value when decoding stops, so it is
   read as 0 while `num_running_reqs` is 0.
3. `sglang:generation_tokens_total`: added in `observe_one_finished_request()`, i.e. at request
   end, so it arrives in request-sized steps (realtime=False).

The scheduler sets its gauges (num_running_reqs, num_queue_reqs, token_usage, gen_throughput)
only when it logs prefill or decode statistics, so once a batch drains they can keep their
last busy values: for 30 s until the idle report of recent builds (sglang#26495, #31517), or for
good in builds without one (sglang#4244 for gen_throughput). They are the Reading's engine
report: once it stayed bit-identical while the requests it counted as running finished, and no
counter has moved for base.STALE_REPORT_S, the server is idle: generation reads 0, where it
read as gen_throughput's last value, or as unknown (None) with a realtime counter standing
still; and running, waiting and KV usage read 0, where they read as the last busy log (an idle
scheduler holds no KV but evictable cache, which token_usage leaves out). A batch between two
logs also leaves the gauges and the decode counter standing still, but it finishes fewer
requests than it runs, or it logs again.

Labels: 2024 builds (v0.3) named the model in `name` and the queue gauges
`sglang:num_requests_running` / `sglang:num_requests_waiting`; later ones use `model_name`,
`sglang:num_running_reqs` and `sglang:num_queue_reqs`. Both spellings are read. Scheduler metrics
carry `tp_rank`, `pp_rank`, `moe_ep_rank` and, with DP attention, `dp_rank`. The TP (and PP, EP)
ranks of one data-parallel shard mirror one scheduler's numbers, so summing them would multiply
every figure by the TP size: they collapse to their maximum, which equals rank 0's value while
the mirrors agree and stays monotonic if one of them lags a scrape behind. DP ranks (and
everything else) are summed. The tokenizer's histograms (TTFT, ITL, and the prompt lengths
`sglang:prompt_tokens_histogram` with `--collect-tokens-histogram`) carry no rank labels.
Reference: shared/reference/inference_server_metrics.md sections 3 and 10.
"""

from __future__ import annotations

from collections.abc import Mapping

from powerd.sources.base import (
    Reading,
    SourceError,
    first_histogram,
    gauge_max,
    gauge_total,
    histogram,
    label_values,
    series_values,
    total,
)
from powerd.sources.exposition import Samples, Wanted
from powerd.sources.vllm import MODEL_LABELS, hist_names, start_time_marker

MIRRORS = frozenset({"tp_rank", "pp_rank", "moe_ep_rank"})
_MODE = frozenset({"mode"})
P = "sglang:"
_RUNNING = (P + "num_running_reqs", P + "num_requests_running")
_WAITING = (P + "num_queue_reqs", P + "num_requests_waiting")
_REPORT_GAUGES = frozenset({"running", "waiting", "kv_usage"})


def _first_gauge(samples: Samples, names: tuple[str, ...]) -> float | None:
    """The gauge total of the first spelling in `names` that is present, ranks collapsed."""
    for name in names:
        value = gauge_total(samples, name, mirrors=MIRRORS)
        if value is not None:
            return value
    return None


class SglangExtractor:
    kind = "sglang"

    def __init__(self) -> None:
        self.wanted = Wanted.of(
            [
                P + "realtime_tokens_total",
                P + "gen_throughput",
                P + "generation_tokens_total",
                P + "prompt_tokens_total",
                P + "num_requests_total",
                P + "num_running_reqs",
                P + "num_queue_reqs",
                P + "num_requests_running",
                P + "num_requests_waiting",
                P + "token_usage",
                "process_start_time_seconds",
                *hist_names(
                    P + "time_to_first_token_seconds",
                    P + "inter_token_latency_seconds",
                    P + "time_per_output_token_seconds",
                    P + "prompt_tokens_histogram",
                ),
            ]
        )

    def extract(self, samples: Samples, headers: Mapping[str, str]) -> Reading:
        running = _first_gauge(samples, _RUNNING)
        gen_throughput = gauge_total(samples, P + "gen_throughput", mirrors=MIRRORS)
        finished_tokens = series_values(samples, P + "generation_tokens_total", mirrors=MIRRORS)
        reading = Reading(realtime=True)
        if P + "realtime_tokens_total" in samples:
            # The scheduler adds a batch's decode tokens every decode_log_interval (40) steps,
            # about once a second: per-second deltas alternate between nothing and double.
            reading.flushed = frozenset({"generation"})
            reading.prompt_per_chunk = True
            for name, mode in (("generation", "decode"), ("prompt", "prefill_compute")):
                reading.counters[name] = (
                    series_values(
                        samples,
                        P + "realtime_tokens_total",
                        mirrors=MIRRORS,
                        select={"mode": mode},
                        drop=_MODE,
                    )
                    or {}
                )
        elif gen_throughput is not None:
            reading.gen_mode = "gauge"
            # The gauge holds its last value once decoding stops.
            reading.gauges["generation_rate"] = gen_throughput if running else 0.0
        elif finished_tokens is not None:
            reading.realtime = False
            reading.counters["generation"] = finished_tokens
        else:
            raise SourceError(
                "has no sglang:realtime_tokens_total, sglang:gen_throughput or "
                "sglang:generation_tokens_total (is it an SGLang server with --enable-metrics?)"
            )
        if "prompt" not in reading.counters:
            prompt = series_values(samples, P + "prompt_tokens_total", mirrors=MIRRORS)
            if prompt is not None:
                reading.counters["prompt"] = prompt
        reading.generation_tokens_total = total(finished_tokens)
        finished = series_values(samples, P + "num_requests_total", mirrors=MIRRORS)
        if finished is not None:
            reading.counters["finished"] = finished
        if running is not None:
            reading.gauges["running"] = running
        waiting = _first_gauge(samples, _WAITING)
        if waiting is not None:
            reading.gauges["waiting"] = waiting
        kv_usage = gauge_max(samples, P + "token_usage", mirrors=MIRRORS)
        if kv_usage is not None:
            reading.gauges["kv_usage"] = kv_usage
        reading.report = (running, waiting, kv_usage, gen_throughput)
        reading.report_gauges = _REPORT_GAUGES
        ttft = histogram(samples, P + "time_to_first_token_seconds", mirrors=MIRRORS)
        if ttft is not None:
            reading.hists["ttft"] = ttft
        itl = first_histogram(
            samples,
            P + "inter_token_latency_seconds",
            P + "time_per_output_token_seconds",
            mirrors=MIRRORS,
        )
        if itl is not None:
            reading.hists["itl"] = itl
        prompt_len = histogram(samples, P + "prompt_tokens_histogram", mirrors=MIRRORS)
        if prompt_len is not None:
            reading.hists["prompt_len"] = prompt_len
        reading.markers["start"] = start_time_marker(samples)
        reading.model_names = label_values(
            samples,
            (*_RUNNING, P + "gen_throughput", P + "generation_tokens_total"),
            MODEL_LABELS,
        )
        return reading


def sglang_extractor() -> SglangExtractor:
    return SglangExtractor()
