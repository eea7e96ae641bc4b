"""Shared test helpers: small WFDB records written the way real archives store them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import wfdb

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def write_record(folder: Path, name: str, signal_mv: np.ndarray, fs: float,
                 lead_names: list[str], gain: float = 200.0) -> Path:
    """Write (n, k) millivolts as a format-16 WFDB record; NaN becomes WFDB's missing value."""
    folder.mkdir(parents=True, exist_ok=True)
    digital = np.round(np.nan_to_num(signal_mv, nan=0.0) * gain)
    digital = np.clip(digital, -32767, 32767).astype(np.int16)
    digital[np.isnan(signal_mv)] = -32768
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(lead_names), sig_name=list(lead_names),
                d_signal=digital, fmt=["16"] * len(lead_names), adc_gain=[gain] * len(lead_names),
                baseline=[0] * len(lead_names), write_dir=str(folder))
    return folder / name


def leads_signal(n: int, fs: float, names: list[str], seed: int = 0) -> np.ndarray:
    """A distinct, smooth test pattern per lead: a sine whose frequency encodes the lead."""
    t = np.arange(n) / fs
    rng = np.random.default_rng(seed)
    phases = rng.uniform(0, 2 * np.pi, len(names))
    return np.stack([(0.5 + 0.1 * j) * np.sin(2 * np.pi * (1 + j) * t + phases[j])
                     for j in range(len(names))], axis=1)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (a user's clone has no shared/ folder)")
    return SHARED


@pytest.fixture(scope="session")
def small_prepared(tmp_path_factory) -> Path:
    """A prepared synthetic cohort of 40 ECGs, shared by the stage-one and stage-two tests."""
    from pipeline.params import PrepareParams
    from stages.prepare.run import prepare
    from stages.prepare.synthetic.cohort import write_cohort

    root = tmp_path_factory.mktemp("small") / "raw"
    write_cohort(root, n=40, seed=11)
    out = root.parent / "prepared"
    prepare("synthetic", root, out, PrepareParams(workers=0))
    return out


PROJECT_PARAMS = """
synth: {out: raw, n: 90, seed: 3}
data: {source: synthetic, root: raw}
prepare: {out: prepared, workers: 0}
extract: {out: cache, device: cpu, shard_rows: 32}
backbones:
  dlinear: {per_lead: true, batch_size: 64, model: {seq_len: 500, pred_len: 4, kernel: 25}}
  tempo: {batch_size: 64, model: {d_model: 8, layers: 1, heads: 2, lora_r: 2, pred_len: 8}}
  gate: {model: {leads: [II], length: 500}}
  rhythm: {}
  morphology: {}
fit:
  backbones: [dlinear, tempo, rhythm, morphology]
  inputs: {dlinear: per_lead}
  gate_inputs: [gate, rhythm]
  evaluation: split
  seeds: 2
  max_epochs: 8
  oof_folds: 3
  bootstrap: 50
tasks: [rr, sex, ad]
"""


def cli_ok(args: list[str]) -> str:
    """Run a `pipeline` command in-process; fail the test with its output if it fails."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory) -> Path:
    """A small project trained through the command line (synth, prepare, extract, fit,
    export), holding ``bundle/``; the working directory is restored."""
    root = tmp_path_factory.mktemp("project")
    (root / "params.yaml").write_text(PROJECT_PARAMS)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        cli_ok(["synth"])
        cli_ok(["prepare"])
        for backbone in ("dlinear", "tempo", "gate", "rhythm", "morphology"):
            cli_ok(["extract", "--backbone", backbone])
        for task in ("rr", "sex", "ad"):
            cli_ok(["fit-ensemble", "--task", task])
        cli_ok(["export", "--out", "bundle"])
    return root
