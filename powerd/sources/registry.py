"""Kind name -> extractor, and the Source factory."""

from __future__ import annotations

from collections.abc import Callable

from powerd.config import ServerConfig
from powerd.sources.base import Extractor, Fetcher, Source, SourceError
from powerd.sources.fetch import http_fetch
from powerd.sources.generic import generic_extractor
from powerd.sources.llamacpp import llamacpp_extractor
from powerd.sources.lmdeploy import lmdeploy_extractor
from powerd.sources.nim import nim_extractor
from powerd.sources.sglang import sglang_extractor
from powerd.sources.tgi import tgi_extractor
from powerd.sources.triton import triton_extractor
from powerd.sources.trtllm import trtllm_extractor
from powerd.sources.vllm import vllm_extractor

_FACTORIES: dict[str, Callable[[], Extractor]] = {
    "vllm": vllm_extractor,
    "sglang": sglang_extractor,
    "tgi": tgi_extractor,
    "llamacpp": llamacpp_extractor,
    "triton": triton_extractor,
    "nim": nim_extractor,
    "lmdeploy": lmdeploy_extractor,
    "trtllm": trtllm_extractor,
}
KINDS = (*_FACTORIES, "generic")


def extractor_for(kind: str, config: ServerConfig) -> Extractor:
    """The extractor of a concrete kind; raises SourceError for an unknown one."""
    if kind == "generic":
        return generic_extractor(config.generic)
    factory = _FACTORIES.get(kind)
    if factory is None:
        raise SourceError(f"unknown server kind {kind!r} (known: auto, {', '.join(KINDS)})")
    return factory()


def make_source(config: ServerConfig, fetch: Fetcher = http_fetch) -> Source:
    """A Source for one configured server.

    Raises SourceError for a kind it does not know or a generic kind without metric names.
    """
    extractor = None if config.kind == "auto" else extractor_for(config.kind, config)
    return Source(config, fetch, extractor, lambda kind: extractor_for(kind, config))
