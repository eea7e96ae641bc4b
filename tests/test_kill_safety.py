"""Killed runs lose nothing: each test SIGKILLs a real process at a chosen step, then checks
that every output is the complete old or the complete new one, and that a re-run finishes
exactly as an uninterrupted run would."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pipeline.staging as staging
from pipeline.params import FitParams
from pipeline.staging import replace_dir, staged_dir
from stages.extract.backbones import create_backbone
from stages.fit.run import fit_task
from tests.test_extract import SMALL, _arrays, _extract
from tests.test_fit import _params, fake  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]

# Runs CODE after wrapping TARGET (a dotted module attribute) so that the process kills
# itself with SIGKILL just before or just after the NTH call: no timing, no races.
_KILL_AT = """
import importlib, os, signal, sys
target, nth, when, code = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
module_name, attr = target.rsplit(".", 1)
module = importlib.import_module(module_name)
real, calls = getattr(module, attr), [0]
def wrapper(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(*args, **kwargs)
    if calls[0] == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return out
setattr(module, attr, wrapper)
exec(code)
"""

# Tears one chunk-file write of the Zarr store in half, then SIGKILLs: a shard caught while
# it is being written, through zarr's own write path.
_TEAR_WRITE = """
import contextlib, os, signal, sys
import zarr.storage._local as local
nth, code = int(sys.argv[1]), sys.argv[2]
real, calls = local._atomic_write, [0]
class _Torn:
    def __init__(self, f):
        self.f = f
    def write(self, view):
        data = bytes(memoryview(view))
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
@contextlib.contextmanager
def torn(path, mode, exclusive=False):
    with real(path, mode, exclusive) as f:
        calls[0] += "/c/" in path.as_posix()
        yield _Torn(f) if calls[0] == nth and "/c/" in path.as_posix() else f
local._atomic_write = torn
exec(code)
"""


def _killed(script: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, f"the child was not killed where planned:\n{proc.stderr}"


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- atomic replacement ---------------------------------------------------------------

_REPLACE = """
from pathlib import Path
import pipeline.staging as staging
root = Path({root!r})
if {no_swap}:
    staging._SWAP = None
with staging.staged_dir(root / "out") as tmp:
    (tmp / "a.txt").write_text("new")
    (tmp / "b.txt").write_text("new")
"""


@pytest.mark.slow
@pytest.mark.parametrize("no_swap,target,nth,when", [
    (False, "pipeline.staging.swap_paths", 1, "before"),
    (False, "pipeline.staging.swap_paths", 1, "after"),   # swapped, old not yet deleted
    (False, "shutil.rmtree", 1, "after"),
    (False, "os.unlink", 1, "after"),   # while the old folder is being deleted
    (True, "os.replace", 1, "before"),
    (True, "os.replace", 1, "after"),   # between the fallback's two renames
    (True, "os.replace", 2, "after"),
    (True, "os.unlink", 1, "after"),
])
def test_a_published_folder_is_always_whole_old_or_whole_new(tmp_path, no_swap, target, nth,
                                                             when):
    out = tmp_path / "out"
    with staged_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
        (tmp / "c.txt").write_text("old")
    old = _listing(out)
    new = {"a.txt": b"new", "b.txt": b"new"}
    _killed(_KILL_AT, target, str(nth), when,
            _REPLACE.format(root=str(tmp_path), no_swap=no_swap))
    if target == "os.unlink":  # killed inside the deletion: half of the old folder is left
        left = [_listing(p) for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert len(left) == 1 and len(left[0]) == 1 and left[0].items() <= old.items()
    if out.exists():
        assert _listing(out) in (old, new)
    else:  # only the fallback, between its two renames: the old folder waits under a name
        assert no_swap and [_listing(p) for p in tmp_path.glob(".out.old-*")] == [old]
    staging.recover(out)
    assert _listing(out) in (old, new)
    with staged_dir(out) as tmp:  # the next run clears every leftover
        (tmp / "a.txt").write_text("next")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert _listing(out) == {"a.txt": b"next"}


def test_replace_dir_swaps_in_one_step_where_the_file_system_can(tmp_path, monkeypatch):
    (tmp_path / "new").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "new" / "x").write_text("new")
    (tmp_path / "out" / "x").write_text("old")
    renames = []
    monkeypatch.setattr(staging.os, "replace", lambda *a: renames.append(a))
    replace_dir(tmp_path / "new", tmp_path / "out")
    assert renames == [], "the swap path renames nothing, it exchanges"
    assert (tmp_path / "out" / "x").read_text() == "new"
    assert not (tmp_path / "new").exists()


# ---- extraction -----------------------------------------------------------------------

_EXTRACT = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from tests.test_extract import _extract
_extract("moment", Path({prepared!r}), Path({cache!r}))
"""


@pytest.fixture(scope="module")
def whole_moment(small_prepared, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("whole")
    _extract("moment", small_prepared, cache)
    return cache / "moment.zarr"


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["after the second shard is marked done",
                                  "while the second shard is being written"])
def test_a_killed_extraction_resumes_to_the_identical_store(small_prepared, whole_moment,
                                                            tmp_path, kill):
    code = _EXTRACT.format(root=str(ROOT), prepared=str(small_prepared), cache=str(tmp_path))
    if kill.startswith("after"):
        _killed(_KILL_AT, "stages.extract.run.write_shard", "2", "after", code)
        done = 2
    else:
        per_shard = len(create_backbone("moment", SMALL["moment"], per_lead=True).arrays())
        _killed(_TEAR_WRITE, str(per_shard + 1), code)
        done = 1
    assert not (tmp_path / "moment.zarr").exists()  # nothing published by the killed run
    assert len(list((tmp_path / ".moment.partial" / "done").iterdir())) == done
    summary = _extract("moment", small_prepared, tmp_path)
    assert summary["status"] == "resumed" and summary["computed_rows"] == 40 - 16 * done
    whole, resumed = _arrays(whole_moment), _arrays(tmp_path / "moment.zarr")
    assert whole.keys() == resumed.keys()
    for key in whole:
        np.testing.assert_array_equal(whole[key], resumed[key])
    store_files = lambda p: sorted(f.relative_to(p).as_posix() for f in p.rglob("*"))  # noqa: E731
    assert store_files(tmp_path / "moment.zarr") == store_files(whole_moment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moment.zarr", "weights"]


@pytest.mark.slow
def test_an_extraction_killed_after_publishing_is_up_to_date_and_cleans_up(
        small_prepared, whole_moment, tmp_path):
    code = _EXTRACT.format(root=str(ROOT), prepared=str(small_prepared), cache=str(tmp_path))
    _killed(_KILL_AT, "pipeline.feature_cache.replace_dir", "1", "after", code)
    assert (tmp_path / ".moment.partial").exists()  # its clean-up never ran
    assert _extract("moment", small_prepared, tmp_path)["status"] == "up to date"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moment.zarr", "weights"]
    whole, published = _arrays(whole_moment), _arrays(tmp_path / "moment.zarr")
    for key in whole:
        np.testing.assert_array_equal(whole[key], published[key])


# ---- fit outputs ----------------------------------------------------------------------

_WRITE = """
import pickle, sys
sys.path.insert(0, {root!r})
result, params = pickle.load(open({blob!r}, "rb"))
result.write(params)
"""


def _outputs(params: FitParams) -> dict[str, dict[str, bytes]]:
    return {"metrics": Path(params.metrics, "rr.json").read_bytes(),
            "predictions": Path(params.predictions, "rr.parquet").read_bytes(),
            "models": _listing(Path(params.models, "rr"))}


@pytest.fixture(scope="module")
def old_and_new_fit(fake):  # noqa: F811
    """Two fits whose outputs differ in every file (one seed, then two)."""
    root, _ = fake
    return tuple(fit_task("rr", _params(seeds=seeds, max_epochs=5), root / "cohort.parquet",
                          root / "cache") for seeds in (1, 2))


@pytest.mark.slow
@pytest.mark.parametrize("target,nth,when", [
    ("torch.save", 2, "before"),            # one model of the new set written
    ("pipeline.staging.swap_paths", 1, "after"),  # new models in, old ones not yet deleted
    ("os.replace", 1, "before"),            # predictions written beside, not yet in place
    ("os.replace", 2, "before"),            # predictions in, metrics not yet
])
def test_a_killed_fit_leaves_each_output_old_or_new(old_and_new_fit, tmp_path, target, nth,
                                                    when):
    old, new = old_and_new_fit
    params = _params(metrics=str(tmp_path / "m"), predictions=str(tmp_path / "p"),
                     models=str(tmp_path / "models"))
    refs = {}
    for name, result in (("old", old), ("new", new)):
        folder = tmp_path / f"ref_{name}"
        ref = FitParams(**{**params.__dict__, "metrics": str(folder / "m"),
                           "predictions": str(folder / "p"), "models": str(folder / "models")})
        result.write(ref)
        refs[name] = _outputs(ref)
    assert refs["old"]["models"].keys() != refs["new"]["models"].keys()
    old.write(params)
    blob = tmp_path / "new.pkl"
    blob.write_bytes(pickle.dumps((new, params)))
    _killed(_KILL_AT, target, str(nth), when, _WRITE.format(root=str(ROOT), blob=str(blob)))
    after = _outputs(params)
    for output, content in after.items():
        assert content in (refs["old"][output], refs["new"][output]), output
    new.write(params)
    assert _outputs(params) == refs["new"]
    for folder in ("m", "p", "models"):
        assert not [p for p in (tmp_path / folder).iterdir() if p.name.startswith(".")]
