import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["synth"], ["prepare"], ["extract"],
                                     ["fit-ensemble"], ["report"], ["export"], ["predict"],
                                     ["explain"]])
def test_help_works(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_stage_two_commands_fail_clearly(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(f"prepare:\n  out: {tmp_path / 'none'}\nfit:\n"
                      f"  metrics: {tmp_path / 'metrics'}\n")
    result = runner.invoke(app, ["fit-ensemble", "--task", "height", "--params", str(params)])
    assert result.exit_code == 1 and "unknown task 'height'" in result.output
    result = runner.invoke(app, ["fit-ensemble", "--task", "rr", "--params", str(params)])
    assert result.exit_code == 1 and "cohort.parquet" in result.output
    if not torch.cuda.is_available():  # a GPU asked for where there is none, said first
        result = runner.invoke(app, ["fit-ensemble", "--task", "rr", "--device", "cuda",
                                     "--params", str(params)])
        assert result.exit_code == 1 and "no CUDA device" in result.output
    result = runner.invoke(app, ["report", "--params", str(params), "--out", str(tmp_path)])
    assert result.exit_code == 1 and "fit-ensemble" in result.output


def test_bad_params_file_is_reported(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("prepare:\n  fz: 1\n")
    result = runner.invoke(app, ["prepare", "--params", str(params)])
    assert result.exit_code == 1
    assert "unknown key(s) fz" in result.output


def test_synth_then_prepare_from_the_command_line(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    result = runner.invoke(app, ["synth", "--out", str(raw), "--n", "20", "--seed", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["prepare", "--source", "synthetic", "--root", str(raw),
                                 "--out", str(out), "--workers", "0",
                                 "--params", str(tmp_path / "none.yaml")])
    assert result.exit_code == 0, result.output
    assert "20 of 20 records" in result.output
    assert (out / "cohort.parquet").exists() and (out / "signals.h5").exists()
