"""`powerd bench` arguments, errors and output files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from powerd.bench.cli import add_bench_arguments, run_bench_command, setup_from_args
from powerd.bench.options import POLICY_NAMES, OracleOptions
from powerd.sim.plant import PROFILE_DIR


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="powerd bench")
    add_bench_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults() -> None:
    args = _parse()
    setup = setup_from_args(args)
    assert args.policies == ",".join(POLICY_NAMES)
    assert setup.trace == "azure-conv"
    assert setup.duration_s == 3600.0
    assert (setup.gpus, setup.tp, setup.gpu_model) == (4, 1, "h100-sxm")
    assert setup.model_name == "llama-3.1-8b"
    assert setup.peak_load == 0.7
    assert setup.server_kind == "vllm"
    assert setup.seed == 0
    assert setup.interval_s == 1.0
    assert setup.oracle == OracleOptions()


def test_every_option_parses() -> None:
    args = _parse(
        "--trace", "diurnal", "--rate-scale", "1.5", "--duration", "120", "--gpu-model", "h200",
        "--model", "llama-3.1-70b", "--gpus", "8", "--tp", "4", "--server-kind", "sglang",
        "--policies", "default,powerd,oracle", "--seed", "7", "--json", "/tmp/x.json",
        "--markdown", "/tmp/x.md", "--plot", "/tmp/x.png", "--ttft-slo", "3", "--itl-slo",
        "0.05", "--oracle-window", "30", "--oracle-slack", "0", "--workers", "1",
        "--interval", "0.5",
    )  # fmt: skip
    setup = setup_from_args(args)
    assert setup.trace == "diurnal" and setup.duration_s == 120.0
    assert setup.peak_load is None and setup.rate_scale == 1.5
    assert setup.gpu_profile().name == "h200"
    assert (setup.gpus, setup.tp, setup.model_name) == (8, 4, "llama-3.1-70b")
    assert setup.server_kind == "sglang" and setup.seed == 7
    assert (setup.slo.ttft_s, setup.slo.itl_s) == (3.0, 0.05)
    assert setup.oracle.window_s == 30.0 and setup.oracle.slack == 0.0 and setup.workers == 1
    assert setup.interval_s == 0.5
    assert (args.json, args.markdown, args.plot) == ("/tmp/x.json", "/tmp/x.md", "/tmp/x.png")


def test_peak_load_overrides_rate_scale() -> None:
    setup = setup_from_args(_parse("--rate-scale", "2", "--peak-load", "0.5"))
    assert setup.peak_load == 0.5
    assert "peak load 0.50" in setup.load_description()


def test_gpu_profile_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text((PROFILE_DIR / "a100-sxm4-80gb.yaml").read_text())
    setup = setup_from_args(_parse("--gpu-profile", str(path)))
    assert setup.gpu_profile().sm_clock_max_mhz == 1410


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policies", "default,turbo"], "unknown policy 'turbo'"),
        (["--gpus", "4", "--tp", "3"], "--tp (3) must divide --gpus (4)"),
        (["--gpu-model", "b300"], "unknown GPU profile 'b300'"),
        (["--gpu-profile", str(PROFILE_DIR)], f"GPU profile {PROFILE_DIR} is a folder; name a"),
        (["--model", "gpt-9"], "unknown model profile 'gpt-9'"),
        (["--duration", "0"], "--duration must be positive"),
        (["--duration", "0.5"], "--duration (0.5 s) must be at least one --interval (1 s)"),
        (["--peak-load", "-1"], "--peak-load must be positive"),
        (["--oracle-slack", "-0.1"], "--oracle-slack must be in [0, 1)"),
        (["--interval", "20"], "--interval must be in [0.1, 10]"),
        (["--seed", "-1"], "--seed must be at least 0"),
    ],
)
def test_bad_arguments_exit_2_with_one_sentence(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_bench_command(_parse(*argv)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("powerd bench: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--duration", "inf"),
        ("--peak-load", "inf"),
        ("--rate-scale", "inf"),
        ("--ttft-slo", "nan"),
        ("--ttft-slo", "inf"),
        ("--itl-slo", "nan"),
        ("--itl-slo", "0"),
        ("--oracle-window", "inf"),
    ],
)
def test_numbers_that_are_not_finite_and_positive_name_their_option(
    option: str, value: str
) -> None:
    """Refused before any work, by name: a NaN SLO is met by no request and missed by none
    (every comparison with it is false), and an infinite duration or load fails deep in
    the run without saying which option."""
    with pytest.raises(ValueError) as info:
        setup_from_args(_parse(option, value))
    assert str(info.value) == f"{option} must be positive, got {float(value)}"


def test_missing_trace_file(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse("--trace", "/nonexistent/trace.csv", "--duration", "10", "--gpus", "1",
                  "--policies", "default", "--workers", "1", "--quiet")  # fmt: skip
    assert run_bench_command(args) != 0
    assert "/nonexistent/trace.csv" in capsys.readouterr().err


def test_a_run_without_the_azure_trace_is_labelled_with_what_it_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from powerd.sim import traces

    monkeypatch.setenv(traces.TRACE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(traces, "_repo_root", lambda: tmp_path / "repo")
    out = tmp_path / "r.json"
    args = _parse("--trace", "azure-conv", "--duration", "10", "--gpus", "1", "--tp", "1",
                  "--policies", "default", "--workers", "1", "--json", str(out))  # fmt: skip
    assert run_bench_command(args) == 0
    label = f"diurnal (no {traces.AZURE_CONV_FILE}; set {traces.TRACE_DIR_ENV})"
    assert json.loads(out.read_text())["trace"] == label
    captured = capsys.readouterr()
    assert label in captured.out and label in captured.err.splitlines()[0]


def test_plot_without_matplotlib_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("powerd.bench.report.matplotlib_available", lambda: False)
    assert run_bench_command(_parse("--plot", "/tmp/never.png")) == 2
    assert "needs matplotlib" in capsys.readouterr().err
    assert not Path("/tmp/never.png").exists()


def test_command_prints_the_table_and_writes_json_and_markdown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from powerd.cli import main

    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    argv = [
        "bench", "--trace", "diurnal", "--duration", "30", "--gpus", "1",
        "--policies", "default,slo-lowest-clock,static-clock", "--workers", "1",
        "--json", str(out_json), "--markdown", str(out_md),
        "--plot", str(tmp_path / "b.png"),
    ]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "static-clock" in captured.out and "wall time:" in captured.out
    assert "default:" in captured.err  # progress lines
    doc = json.loads(out_json.read_text())
    assert list(doc["policies"]) == ["default", "slo-lowest-clock", "static-clock"]
    assert doc["powerd_share_of_oracle_saving"] is None
    markdown = out_md.read_text()
    assert markdown.startswith("# powerd bench")
    assert "| default |" in markdown and "| static-clock |" in markdown
    assert (tmp_path / "b.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_output_files_go_into_folders_made_for_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make bench` on a fresh clone writes into out/, which does not exist yet."""
    out_json = tmp_path / "out" / "new" / "bench.json"
    args = _parse("--trace", "constant", "--duration", "10", "--gpus", "1", "--policies",
                  "default", "--workers", "1", "--quiet", "--json", str(out_json))  # fmt: skip
    assert run_bench_command(args) == 0
    assert list(json.loads(out_json.read_text())["policies"]) == ["default"]


def test_an_output_path_that_cannot_be_written_fails_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = _parse("--duration", "10", "--gpus", "1", "--policies", "default", "--workers", "1",
                  "--quiet", "--markdown", str(blocker / "b.md"))  # fmt: skip
    assert run_bench_command(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "", "nothing was run"
    assert captured.err.startswith(f"powerd bench: --markdown {blocker / 'b.md'}: ")
    assert captured.err.count("\n") == 1


def test_a_file_that_fails_to_be_written_after_the_run_keeps_the_table_and_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk or a read-only mount met only at the end: one line naming the option, the
    table printed, the other files written, exit status 1."""

    def full_disk(result: object, path: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("powerd.bench.report.write_json", full_disk)
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    args = _parse("--trace", "constant", "--duration", "10", "--gpus", "1", "--policies",
                  "default", "--workers", "1", "--quiet", "--json", str(out_json),
                  "--markdown", str(out_md))  # fmt: skip
    assert run_bench_command(args) == 1
    captured = capsys.readouterr()
    assert "| default" in captured.out or "default " in captured.out
    assert captured.err == f"powerd bench: --json {out_json}: No space left on device\n"
    assert out_md.read_text().startswith("# powerd bench")


def test_a_gpu_profile_that_is_not_yaml_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [broken\nsm_clock_max_mhz: 1980\n")
    assert run_bench_command(_parse("--gpu-profile", str(bad))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"powerd bench: {bad}: not valid YAML: line ")
    assert err.count("\n") == 1
