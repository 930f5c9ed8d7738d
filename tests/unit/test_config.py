from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from powerd.config import (
    Config,
    ConfigError,
    load_config,
    load_restore_config,
    parse_config,
    read_yaml,
)
from tests.conftest import REPO_ROOT


def test_example_config_is_valid() -> None:
    config = load_config(REPO_ROOT / "config" / "powerd.yaml")
    assert [server.name for server in config.servers] == ["llama-70b", "llama-8b"]
    assert config.servers[0].gpus == (0, 1, 2, 3)
    assert config.metrics.port == 9863


def test_commented_server_examples_are_valid() -> None:
    """Every server the example shows commented out loads as it is written."""
    lines = (REPO_ROOT / "config" / "powerd.yaml").read_text().splitlines()
    start = lines.index("servers:")
    items: list[str] = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        if line.startswith("  # ") and (line.startswith("  # -") or line.startswith("  #   ")):
            items.append("  " + line[4:])
    examples = yaml.safe_load("\n".join(items))
    assert [server["name"] for server in examples] == ["custom", "trtllm"]
    config = parse_config({"servers": examples})
    custom, trtllm = config.servers
    assert custom.generic is not None and custom.generic.waiting == "my_server_queue_length"
    assert trtllm.kind == "trtllm" and trtllm.url.endswith("/prometheus/metrics")


def test_commented_sim_example_is_valid_and_checked() -> None:
    """The example's `sim:` section, uncommented, is what check-config accepts."""
    from powerd.runtime import check_sim_config

    lines = (REPO_ROOT / "config" / "powerd.yaml").read_text().splitlines()
    start = lines.index("# sim:")
    block = [line[2:] for line in lines[start:] if line.startswith("# ")]
    config = parse_config({"gpu_backend": "sim", **yaml.safe_load("\n".join(block))})
    assert config.sim.server_kind == "vllm" and config.sim.state_file is not None
    check_sim_config(config.sim)


def test_empty_document_gives_defaults() -> None:
    assert parse_config(None) == Config()


@pytest.mark.parametrize("text", ["", "\n", "# interval_s: 1\n# mode: off\n", "---\n"])
def test_a_file_without_settings_is_an_error(tmp_path: Path, text: str) -> None:
    """A config emptied by a failed edit or a full disk would run (or be reloaded into) a
    daemon that controls nothing, on the defaults; `{}` says every default on purpose."""
    path = tmp_path / "powerd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: holds no settings (empty, or only comments)")
    path.write_text("{}\n")
    assert load_config(path) == Config()


def _generic(metrics: dict[str, object]) -> dict[str, object]:
    """A config of one generic server reading `metrics`."""
    return {"servers": [{"name": "a", "url": "http://x", "kind": "generic", "generic": metrics}]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"bogus": 1}, "bogus: unknown key"),
        ({"control": {"dither": 1}}, "control.dither: unknown key"),
        ({"interval_s": "fast"}, "interval_s: expected a number"),
        ({"interval_s": 0}, "interval_s: must be in [0.1, 10], got 0"),
        ({"interval_s": 0.000001}, "interval_s: must be in [0.1, 10]"),
        ({"interval_s": 40}, "interval_s: must be in [0.1, 10], got 40"),
        ({"interval_s": 5, "stale_after_s": 2}, "stale_after_s: must be at least interval_s (5)"),
        ({"mode": "turbo"}, "mode: must be one of"),
        ({"mode": "target"}, "target_tokens_per_joule: required"),
        ({"mode": "budget"}, "node_power_budget_w: required"),
        ({"dry_run": "yes"}, "dry_run: expected true or false"),
        ({"gpu_backend": "cuda"}, "gpu_backend: must be one of nvml, sim"),
        ({"servers": [{"url": "http://x/metrics"}]}, "servers[0].name: required"),
        ({"servers": [{"name": "a", "url": "ftp://x"}]}, "servers[0].url: must start with"),
        ({"servers": [{"name": "a", "url": "http://"}]}, "servers[0].url: names no host"),
        ({"servers": [{"name": "a", "url": "http://[::1/m"}]}, "servers[0].url: not a URL"),
        (
            {"servers": [{"name": "a", "url": "http://127.0.0.1:80000/metrics"}]},
            "servers[0].url: not a URL (Port out of range 0-65535), got 'http://127.0.0.1:80000",
        ),
        (
            {"servers": [{"name": "a", "url": "http://127.0.0.1:8OOO/metrics"}]},
            "servers[0].url: not a URL (Port could not be cast to integer value as '8OOO')",
        ),
        (
            {"servers": [{"name": "a", "url": "http://127.0.0.1:8000/metrics "}]},
            "servers[0].url: must not contain spaces or control characters",
        ),
        (
            {"servers": [{"name": "a", "url": "http://host name/metrics"}]},
            "servers[0].url: must not contain spaces or control characters",
        ),
        (
            {
                "servers": [
                    {
                        "name": "a",
                        "url": "http://x",
                        "kind": "vllm",
                        "generic": {"generation_tokens": "t"},
                    }
                ]
            },
            "servers[0].generic: read only with kind: generic (kind is vllm)",
        ),
        (
            {
                "servers": [
                    {
                        "name": "a",
                        "url": "http://x",
                        "kind": "generic",
                        "generic": {"generation_tokens": "t", "labels": {"model": None}},
                    }
                ]
            },
            "servers[0].generic.labels.model: expected a string, got None",
        ),
        (
            _generic({"generation_tokens": 'my_tokens_total{model="a"}'}),
            "servers[0].generic.generation_tokens: not a Prometheus metric name (letters, digits, "
            "_ and :; select series with labels:), got 'my_tokens_total{model=\"a\"}'",
        ),
        (
            _generic({"generation_tokens": ""}),
            "servers[0].generic.generation_tokens: not a Prometheus metric name",
        ),
        (
            _generic({"generation_tokens": "t", "waiting": "queue length"}),
            "servers[0].generic.waiting: not a Prometheus metric name",
        ),
        (
            _generic({"generation_tokens": "t", "labels": {"model-name": "a"}}),
            "servers[0].generic.labels: not a Prometheus label name, got 'model-name'",
        ),
        (
            {"servers": [{"name": "a", "url": "http://x", "slo": {"ttft_s": -1}}]},
            "servers[0].slo.ttft_s: must be a positive number",
        ),
        (
            {"servers": [{"name": "a", "url": "http://x", "slo": {"quantile": 1.5}}]},
            "servers[0].slo.quantile",
        ),
        (
            {"servers": [{"name": "a", "url": "http://x", "slo": {"max_waiting": float("inf")}}]},
            "servers[0].slo.max_waiting: must be a finite number >= 0, got inf",
        ),
        (
            {"servers": [{"name": "a", "url": "http://x", "slo": {"max_waiting": -1}}]},
            "servers[0].slo.max_waiting: must be a finite number >= 0, got -1",
        ),
        ({"servers": [{"name": "a", "url": "http://x", "kind": "x"}]}, "servers[0].kind"),
        (
            {"servers": [{"name": "a", "url": "http://x", "kind": "generic"}]},
            "servers[0].generic: required",
        ),
        (
            {"servers": [{"name": "a", "url": "http://x", "gpus": [0.5]}]},
            "servers[0].gpus[0]",
        ),
        (
            {"servers": [{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]},
            "servers[1].name: 'a' is used twice",
        ),
        (
            {"servers": [{"name": "a", "url": "http://x", "timeout_s": 2}]},
            "servers[0].timeout_s: must be at most interval_s (1), got 2",
        ),
        (
            {"servers": [{"name": "a", "url": "http://x", "gpus": []}]},
            "servers[0].gpus: must list at least one GPU; leave the key out to discover them",
        ),
        (
            {"servers": [{"name": "a", "url": "http://x", "gpus": [-1]}]},
            "servers[0].gpus[0]: a GPU index must be >= 0, got -1",
        ),
        (
            {"servers": [{"name": "a", "url": "http://x", "gpus": [0, 0]}]},
            "servers[0].gpus[1]: GPU 0 is listed twice",
        ),
        (
            {"servers": [{"name": "a", "url": "http://x", "gpus": ["GPU-1", "GPU-1"]}]},
            "servers[0].gpus[1]: GPU 'GPU-1' is listed twice",
        ),
        ({"mode": True}, "mode: expected a string, got True (YAML reads unquoted"),
        ({"metrics": {"listen_address": "not an address"}}, "metrics.listen_address: not an IP"),
        ({"metrics": {"listen_address": "10.0.0.300"}}, "metrics.listen_address"),
        ({"metrics": {"port": 70000}}, "metrics.port"),
        ({"metrics": {"final_scrape_wait_s": 90}}, "metrics.final_scrape_wait_s"),
        ({"metrics": {"final_scrape_wait_s": -1}}, "metrics.final_scrape_wait_s"),
        ({"metrics": {"web_config_file": ""}}, "metrics.web_config_file: must not be empty"),
        ({"metrics": {"web_config_file": " "}}, "metrics.web_config_file: must not be empty"),
        ({"grid": {"price_schedule_per_kwh": [0.1] * 23}}, "grid.price_schedule_per_kwh"),
        ({"grid": {"price_per_kwh": -0.1}}, "grid.price_per_kwh: must be a finite number >= 0"),
        ({"grid": {"price_per_kwh": float("inf")}}, "grid.price_per_kwh: must be a finite"),
        ({"grid": {"carbon_g_per_kwh": -1}}, "grid.carbon_g_per_kwh: must be a finite number"),
        (
            {"grid": {"carbon_schedule_g_per_kwh": [100.0] * 23 + [-1]}},
            "grid.carbon_schedule_g_per_kwh[23]: must be a finite number >= 0",
        ),
        ({"grid": {"pue": float("inf")}}, "grid.pue: must be a finite number >= 1, got inf"),
        (
            {"grid": {"timezone": "Europe/Berln"}},
            "grid.timezone: not an IANA time zone name (such as Europe/Berlin, America/Chicago "
            "or UTC), got 'Europe/Berln'",
        ),
        ({"grid": {"timezone": ""}}, "grid.timezone: not an IANA time zone name"),
        ({"grid": {"timezone": 1}}, "grid.timezone: expected a string, got 1"),
        (
            {"grid": {"price_weekend_schedule_per_kwh": [0.1] * 24}},
            "grid.price_weekend_schedule_per_kwh: needs price_schedule_per_kwh too",
        ),
        (
            {
                "grid": {
                    "carbon_schedule_g_per_kwh": [300] * 24,
                    "carbon_weekend_schedule_g_per_kwh": [300] * 23,
                }
            },
            "grid.carbon_weekend_schedule_g_per_kwh: needs 24 hourly values, got 23",
        ),
        ({"grid": {"file": ""}}, "grid.file: must not be empty; leave the key out for no file"),
        ({"grid": {"file": 7}}, "grid.file: expected a string, got 7"),
        ({"grid": {"max_age_s": 0}}, "grid.max_age_s: must be a positive number, got 0"),
        ({"grid": {"currency": " "}}, "grid.currency: must not be empty"),
        ({"grid": {"price_file": "/run/powerd/grid.json"}}, "grid.price_file: unknown key"),
        ({"sim": {"gpus": 4, "tp": 3}}, "sim.tp: must divide gpus"),
        ({"sim": {"server_kind": "nope"}}, "sim.server_kind: must be one of vllm"),
        ({"sim": {"seed": -1}}, "sim.seed: must be >= 0, got -1"),
        ({"sim": {"state_file": ""}}, "sim.state_file: must not be empty; leave the key out"),
        ({"state_dir": ""}, "state_dir: must not be empty (the folder of the saved GPU"),
        ({"interval_s": "1e0"}, "interval_s: expected a number, got the text '1e0' (YAML reads"),
        ({"interval_s": "fast"}, "interval_s: expected a number, got 'fast'"),
        (
            {"servers": [{"name": "  ", "url": "http://127.0.0.1:8000/metrics"}]},
            "servers[0].name: must not be empty",
        ),
        ([1, 2], "the top level: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert message in str(info.value)


def test_restore_takes_the_default_for_an_empty_state_dir(tmp_path: Path) -> None:
    """An empty state_dir would be the folder restore runs in, where no journal is: the
    restore would find nothing and succeed while the GPUs stay throttled."""
    path = tmp_path / "powerd.yaml"
    path.write_text("state_dir: ''\ngpu_backend: sim\n")
    config, problems = load_restore_config(path)
    assert config.state_dir == Config().state_dir and config.gpu_backend == "sim"
    assert problems[-1] == (
        "state_dir: must not be empty (the folder of the saved GPU settings); using the "
        f"default state_dir {Config().state_dir}"
    )


def test_restore_keeps_no_blank_sim_state_file(tmp_path: Path) -> None:
    """A state_file of blanks is refused by run; restore, reading what it can, must not open a
    file named by the blanks in the folder it runs in."""
    path = tmp_path / "powerd.yaml"
    path.write_text("gpu_backend: sim\nsim: {state_file: '  ', gpus: 2}\n")
    config, problems = load_restore_config(path)
    assert config.sim.state_file is None and config.sim.gpus == 2, "the rest of sim kept"
    assert problems[-1] == "sim.state_file: must not be empty; using no state file"


def test_grid_with_a_live_file_timezone_and_weekend_schedules() -> None:
    weekdays = [0.30 if 16 <= hour < 21 else 0.12 for hour in range(24)]
    config = parse_config(
        {
            "grid": {
                "file": "/run/powerd/grid.json",
                "max_age_s": 3600,
                "timezone": "America/Los_Angeles",
                "currency": "USD",
                "price_schedule_per_kwh": weekdays,
                "price_weekend_schedule_per_kwh": [0.12] * 24,
                "carbon_g_per_kwh": 250,
            }
        }
    )
    grid = config.grid
    assert grid.file == "/run/powerd/grid.json" and grid.max_age_s == 3600.0
    assert grid.timezone == "America/Los_Angeles"
    assert grid.price_schedule_per_kwh is not None and grid.price_schedule_per_kwh[17] == 0.30
    assert grid.price_weekend_schedule_per_kwh == (0.12,) * 24
    assert parse_config(None).grid.max_age_s == 7200.0


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("servers: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    # One line that says where: a reload's log line and check-config's output stay one line.
    bad.write_text("a: [1\nb: 2\n")
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    assert str(error.value) == (
        f"{bad}: not valid YAML: line 2, column 2: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence from line 1, column 4)"
    )


def test_a_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "powerd.yaml"
    path.write_bytes(b"interval_s: 1\n# price in \x80 (Windows-1252)\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: not UTF-8 (byte 0x80 on line 2); save it as UTF-8"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("interval_s: 1\nmode: efficiency\nmode: off\n", "line 3: key 'mode' is given twice"),
        (
            "servers:\n  - name: a\n    url: http://x\n    slo: {ttft_s: 1}\n"
            "    slo: {itl_s: 0.05}\n",
            "line 5: key 'slo' is given twice (first on line 4)",
        ),
        ("slo: {a: 1, a: 2}\n", "line 1: key 'a' is given twice"),
    ],
)
def test_a_key_given_twice_is_an_error_naming_it_and_its_line(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "powerd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {message}")


def test_yaml_merge_keys_may_override_what_they_merge(tmp_path: Path) -> None:
    path = tmp_path / "powerd.yaml"
    path.write_text(
        "servers:\n  - &a {name: a, url: 'http://x', slo: {ttft_s: 1.0}}\n  - <<: *a\n    name: b\n"
    )
    config = load_config(path)
    assert [s.name for s in config.servers] == ["a", "b"]
    assert config.servers[1].slo.ttft_s == 1.0


def test_a_merged_mapping_that_overrides_a_merge_of_its_own_is_no_duplicate(
    tmp_path: Path,
) -> None:
    """PyYAML flattens a merged mapping in place, its own merge included: its keys must be
    checked as written, not as flattened, whichever of the two is read first."""
    path = tmp_path / "merge.yaml"
    path.write_text("top:\n  inner: &m\n    <<: {x: 1}\n    x: 2\nuse:\n  <<: *m\n  z: 1\n")
    assert read_yaml(path) == yaml.safe_load(path.read_text())
    path.write_text("base: &b {x: 1}\nuse:\n  <<: *b\n  y: 1\n  y: 2\n")
    with pytest.raises(ConfigError, match="line 5: key 'y' is given twice"):
        read_yaml(path)


def test_unquoted_mode_off_is_the_mode_off(tmp_path: Path) -> None:
    """YAML 1.1 reads `off` as false; the example documents `mode: off`."""
    path = tmp_path / "powerd.yaml"
    path.write_text("mode: off\n")
    assert load_config(path).mode == "off"


def test_generic_server_config() -> None:
    config = parse_config(
        {
            "servers": [
                {
                    "name": "custom",
                    "url": "http://127.0.0.1:9000/metrics",
                    "kind": "generic",
                    "gpus": ["GPU-abc"],
                    "generic": {
                        "generation_tokens": "tok_total",
                        "labels": {"model": "m"},
                        "realtime": False,
                    },
                }
            ]
        }
    )
    generic = config.servers[0].generic
    assert generic is not None
    assert generic.generation_tokens == "tok_total"
    assert generic.labels == {"model": "m"}
    assert generic.realtime is False
