from pathlib import Path

import pytest

from pipeline.params import Params, ParamsError, load_params
from pipeline.staging import staged_dir


def test_staged_dir_publishes_only_on_success(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError), staged_dir(out) as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_staging_folders_are_cleared(tmp_path):
    stale = tmp_path / ".out.tmp-123-deadbeef"
    stale.mkdir()
    with staged_dir(tmp_path / "out"):
        pass
    assert not stale.exists()


def test_params_defaults_and_errors(tmp_path):
    assert load_params(tmp_path / "absent.yaml").prepare.fs == 500
    path = tmp_path / "params.yaml"
    path.write_text("prepare:\n  fs: 250\n  split: [0.8, 0.1, 0.1]\n")
    params = load_params(path)
    assert params.prepare.fs == 250 and params.prepare.split == (0.8, 0.1, 0.1)
    path.write_text("prepare:\n  fz: 250\n")
    with pytest.raises(ParamsError, match="unknown key.*fz"):
        load_params(path)
    path.write_text("tasks: [rr, height]\n")
    with pytest.raises(ParamsError, match="unknown task.*height"):
        load_params(path)


@pytest.mark.parametrize("line,message", [
    ("gate_loss: average", "fit.gate_loss must be one of expected, mixture, got 'average'"),
    ("evaluation: holdout", "fit.evaluation must be one of auto, split, cv"),
    ("oof_folds: 1", "fit.oof_folds must be at least 2, got 1"),
    ("combiner: stacking", "fit.combiner must be one of select, gate, got 'stacking'"),
    ("combiner_alpha: 1.5", r"fit.combiner_alpha must lie in \(0, 1\), got 1.5"),
])
def test_fit_choices_are_checked_when_params_load(tmp_path, line, message):
    path = tmp_path / "params.yaml"
    path.write_text(f"fit:\n  {line}\n")
    with pytest.raises(ParamsError, match=message):
        load_params(path)
    path.write_text(f"variants:\n  bad:\n    {line}\n")  # a variant's overrides too
    with pytest.raises(ParamsError, match=message):
        load_params(path)


def test_every_sections_defaults_are_the_shipped_params_yaml():
    """A params file that leaves a key out gets what the shipped params.yaml says (the fit
    defaults once trained with MSE and three experts while params.yaml said L1 and five).
    ``backbones:`` and ``variants:`` are the exceptions: without them each backbone takes its
    class's defaults, and there are no variants to compare."""
    shipped = load_params(Path(__file__).parents[1] / "params.yaml")
    defaults = Params()
    for section in ("synth", "data", "prepare", "extract", "fit"):
        assert getattr(defaults, section) == getattr(shipped, section), section
    assert defaults.tasks == shipped.tasks
