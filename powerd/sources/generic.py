"""`kind: generic`: any server whose metric names the configuration gives.

GenericMetricsConfig names the generated-token metric and whether it is a counter (rated per
series and summed) or a gauge already in tokens/s (summed as it is); prompt tokens follow the same
type. Running and waiting are gauges; TTFT and ITL are histograms in seconds, named by their base
name. A counter may be named with or without `_total`: both spellings are looked up, as the text
format, OpenMetrics and Rust exporters differ on the suffix. Only series carrying all of
`labels` are read. `realtime` is taken from the configuration.
"""

from __future__ import annotations

from collections.abc import Mapping

from powerd.config import GenericMetricsConfig
from powerd.sources.base import (
    Reading,
    SourceError,
    gauge_total,
    histogram,
    label_values,
    series_values,
    total,
)
from powerd.sources.exposition import Samples, SeriesKey, Wanted
from powerd.sources.vllm import HIST_SUFFIXES, MODEL_LABELS, hist_names


def spellings(name: str) -> tuple[str, ...]:
    """The name as given first, then with or without `_total`."""
    if name.endswith("_total"):
        return (name, name[: -len("_total")])
    return (name, name + "_total")


def histogram_base(name: str) -> str:
    for suffix in HIST_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class GenericExtractor:
    kind = "generic"

    def __init__(self, metrics: GenericMetricsConfig) -> None:
        self.metrics = m = metrics
        self.select = dict(m.labels)
        self.counter = m.generation_tokens_type == "counter"
        names: list[str] = [*spellings(m.generation_tokens)]
        if m.prompt_tokens:
            names += spellings(m.prompt_tokens)
        names += [n for n in (m.running, m.waiting) if n]
        self.ttft = histogram_base(m.ttft_histogram) if m.ttft_histogram else None
        self.itl = histogram_base(m.itl_histogram) if m.itl_histogram else None
        names += hist_names(*(h for h in (self.ttft, self.itl) if h))
        self.wanted = Wanted.of(names)

    def _series(self, samples: Samples, name: str) -> dict[SeriesKey, float] | None:
        for spelling in spellings(name):
            values = series_values(samples, spelling, select=self.select)
            if values is not None:
                return values
        return None

    def extract(self, samples: Samples, headers: Mapping[str, str]) -> Reading:
        m = self.metrics
        generation = self._series(samples, m.generation_tokens)
        if generation is None:
            raise SourceError(f"has no {m.generation_tokens} (check generic.generation_tokens)")
        reading = Reading(realtime=m.realtime)
        if self.counter:
            reading.counters["generation"] = generation
            reading.generation_tokens_total = total(generation)
        else:
            reading.gen_mode = reading.prompt_mode = "gauge"
            reading.gauges["generation_rate"] = float(sum(generation.values()))
        if m.prompt_tokens:
            prompt = self._series(samples, m.prompt_tokens)
            if prompt is not None:
                if self.counter:
                    reading.counters["prompt"] = prompt
                else:
                    reading.gauges["prompt_rate"] = float(sum(prompt.values()))
        for gauge, name in (("running", m.running), ("waiting", m.waiting)):
            if name:
                value = gauge_total(samples, name, select=self.select)
                if value is not None:
                    reading.gauges[gauge] = value
        for key, base in (("ttft", self.ttft), ("itl", self.itl)):
            if base:
                hist = histogram(samples, base, select=self.select)
                if hist is not None:
                    reading.hists[key] = hist
        reading.model_names = label_values(samples, spellings(m.generation_tokens), MODEL_LABELS)
        return reading


def generic_extractor(metrics: GenericMetricsConfig | None) -> GenericExtractor:
    if metrics is None:
        raise SourceError("kind generic needs a generic: section naming its metrics")
    return GenericExtractor(metrics)
