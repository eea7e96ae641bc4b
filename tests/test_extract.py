"""Stage one: backbones, the Zarr cache, resume, fingerprints, dask scale-out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stages.extract.run as run
from pipeline.feature_cache import CacheError, open_features
from pipeline.params import BackboneParams, ExtractParams
from pipeline.signal_store import SignalStoreError
from stages.extract.backbones import WeightsError, create_backbone
from stages.extract.run import extract

N = 40
SMALL = {
    "moment": {"d_model": 32, "num_layers": 1, "num_heads": 2, "d_ff": 64},
    "timesnet": {"d_model": 8, "d_ff": 8, "e_layers": 1, "top_k": 2, "num_kernels": 2},
    "dlinear": {"pred_len": 4},
    "gate": {},
    "ecgfm": {"conv_channels": 8, "embed_dim": 16, "layers": 1, "heads": 2, "ffn_dim": 16,
              "conv_pos": 8, "conv_pos_groups": 2},
    "tempo": {"d_model": 8, "layers": 1, "heads": 2, "lora_r": 2, "pred_len": 8},
}


def _extract(name, prepared, cache, force=False, **overrides):
    params = BackboneParams(batch_size=8, per_lead=name in ("moment", "dlinear", "tempo"),
                            model=SMALL[name])
    for key, value in overrides.items():
        setattr(params, key, value)
    return extract(name, params, ExtractParams(out=str(cache), shard_rows=16), prepared,
                   force=force)


def _arrays(path):
    import zarr
    group = zarr.open_group(path, mode="r")
    return {name: group[name][:] for name in group.array_keys()}


@pytest.mark.parametrize("name", list(SMALL))
def test_features_have_the_declared_shape_and_are_deterministic(name, small_prepared, tmp_path):
    summary = _extract(name, small_prepared, tmp_path / "a")
    assert summary["status"] == "built" and summary["rows"] == N
    features, fingerprint = open_features(tmp_path / "a" / f"{name}.zarr")
    backbone = create_backbone(name, SMALL[name], per_lead=name in ("moment", "dlinear", "tempo"))
    expected = {spec.name: spec.shape for spec in backbone.arrays()}
    assert features.shape == (N, *expected["features"])
    arrays = _arrays(tmp_path / "a" / f"{name}.zarr")
    assert {k: v.shape[1:] for k, v in arrays.items()} == expected
    assert all(np.isfinite(v).all() for v in arrays.values())
    assert fingerprint["random_weights"] is backbone.needs_weights
    assert features[:].std(axis=0).max() > 0  # rows differ: features depend on the ECG
    _extract(name, small_prepared, tmp_path / "b")
    again = _arrays(tmp_path / "b" / f"{name}.zarr")
    for key, value in arrays.items():
        np.testing.assert_array_equal(value, again[key])


def test_second_run_is_a_no_op(small_prepared, tmp_path):
    _extract("dlinear", small_prepared, tmp_path)
    assert _extract("dlinear", small_prepared, tmp_path)["status"] == "up to date"


def test_interrupted_extract_resumes_to_the_identical_array(small_prepared, tmp_path,
                                                            monkeypatch):
    _extract("moment", small_prepared, tmp_path / "whole")
    real, calls = run.write_shard, {"n": 0}

    def die_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(*args, **kwargs)

    monkeypatch.setattr(run, "write_shard", die_on_third)
    with pytest.raises(KeyboardInterrupt):
        _extract("moment", small_prepared, tmp_path / "cut")
    assert not (tmp_path / "cut" / "moment.zarr").exists()  # nothing published
    monkeypatch.setattr(run, "write_shard", real)
    summary = _extract("moment", small_prepared, tmp_path / "cut")
    assert summary["status"] == "resumed" and summary["computed_rows"] == N - 32
    whole, resumed = _arrays(tmp_path / "whole" / "moment.zarr"), \
        _arrays(tmp_path / "cut" / "moment.zarr")
    for key in whole:
        np.testing.assert_array_equal(whole[key], resumed[key])
    assert not list((tmp_path / "cut").glob(".moment.partial"))


def test_a_cache_from_other_weights_is_refused_unless_forced(small_prepared, tmp_path):
    _extract("dlinear", small_prepared, tmp_path)
    with pytest.raises(CacheError, match="weights_digest") as err:
        _extract("dlinear", small_prepared, tmp_path, seed=1)
    assert "--force" in str(err.value)
    assert _extract("dlinear", small_prepared, tmp_path, seed=1, force=True)["status"] == "built"
    assert open_features(tmp_path / "dlinear.zarr")[1]["weights_seed"] == 1


def test_a_partial_cache_from_other_settings_is_refused(small_prepared, tmp_path, monkeypatch):
    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "write_shard", die)
    with pytest.raises(KeyboardInterrupt):
        _extract("dlinear", small_prepared, tmp_path)
    monkeypatch.undo()
    with pytest.raises(CacheError, match="model"):
        _extract("dlinear", small_prepared, tmp_path, model={"pred_len": 8})


def test_missing_or_corrupt_signal_store(tmp_path):
    with pytest.raises(SignalStoreError, match="does not exist"):
        _extract("dlinear", tmp_path, tmp_path / "cache")
    (tmp_path / "signals.h5").write_bytes(b"garbage")
    with pytest.raises(SignalStoreError, match="not a readable HDF5"):
        _extract("dlinear", tmp_path, tmp_path / "cache")


def test_missing_weights_name_what_to_pass(small_prepared, tmp_path):
    with pytest.raises(WeightsError, match=r"pass a checkpoint file .*backbones.dlinear.weights"):
        _extract("dlinear", small_prepared, tmp_path, weights=str(tmp_path / "nope.pth"))
    with pytest.raises(WeightsError, match="e.g. AutonLab/MOMENT-1-large"):
        _extract("moment", small_prepared, tmp_path, weights=str(tmp_path / "nope"))


def test_random_moment_weights_take_the_loading_path(tmp_path):
    backbone = create_backbone("moment", SMALL["moment"])
    folder = backbone.prepare_weights("random", seed=5, cache_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [folder.split("/")[-1]]
    backbone.setup(folder, torch.device("cpu"))
    with torch.random.fork_rng():
        torch.manual_seed(5)
        built = backbone.build_random(5)
    for key, value in built.state_dict().items():
        torch.testing.assert_close(backbone.model.state_dict()[key], value, rtol=0, atol=0)
    assert not backbone.model.training


@pytest.mark.slow
def test_two_dask_workers_give_the_same_array(small_prepared, tmp_path):
    # dask workers run torch with one intra-op thread (the nanny sets OMP_NUM_THREADS=1);
    # summation order, and so the last bit, depends on the thread count, so the single
    # process uses one thread too. Shards and batches are identical by construction.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _extract("timesnet", small_prepared, tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    params = BackboneParams(batch_size=8, model=SMALL["timesnet"])
    extract("timesnet", params, ExtractParams(out=str(tmp_path / "two"), shard_rows=16,
                                              workers=2), small_prepared)
    one, two = _arrays(tmp_path / "one" / "timesnet.zarr"), \
        _arrays(tmp_path / "two" / "timesnet.zarr")
    np.testing.assert_array_equal(one["features"], two["features"])


def test_dvc_and_the_fingerprint_watch_the_same_feature_code():
    """`dvc repro` re-runs extract@<backbone> exactly when `pipeline extract` would refuse
    the old cache: both see the same files."""
    import yaml

    from stages.extract.feature_code import ROOT, feature_code

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["extract"]["do"]
    backbones = yaml.safe_load((ROOT / "params.yaml").read_text())["backbones"]
    for key, section in backbones.items():
        deps = {d.replace("${key}", key) for d in stage["deps"] if "${prepare.out}" not in d}
        backbone = create_backbone(key, section.get("model", {}), section.get("per_lead", False))
        assert {p.relative_to(ROOT).as_posix() for p in feature_code(backbone)} == deps, key


def test_a_cache_from_other_feature_code_is_refused_by_name(small_prepared, tmp_path,
                                                            monkeypatch):
    _extract("gate", small_prepared, tmp_path)
    assert _extract("gate", small_prepared, tmp_path)["status"] == "up to date"
    monkeypatch.setattr(run, "code_digest", lambda backbone: "edited")
    with pytest.raises(CacheError, match="code_digest: cached '[0-9a-f]{16}', requested "
                                         "'edited'") as err:
        _extract("gate", small_prepared, tmp_path)
    assert "--force" in str(err.value)
    assert _extract("gate", small_prepared, tmp_path, force=True)["status"] == "built"


def test_the_code_digest_changes_with_a_byte_of_the_backbones_module(tmp_path, monkeypatch):
    """A copy of a backbone's module with one edited line gives another digest."""
    import stages.extract.feature_code as feature_code

    backbone = create_backbone("gate", {}, False)
    before = feature_code.code_digest(backbone)
    source = feature_code.feature_code(backbone)[0]
    copy = tmp_path / source.name
    copy.write_text(source.read_text().replace("\n", "\n# edited\n", 1))
    monkeypatch.setattr(feature_code.inspect, "getsourcefile", lambda cls: str(copy))
    assert feature_code.code_digest(backbone) != before
    copy.write_text(source.read_text())
    assert feature_code.code_digest(backbone) == before


def test_a_float16_cache_halves_the_store_and_keeps_the_features(small_prepared, tmp_path):
    _extract("dlinear", small_prepared, tmp_path / "f32")
    summary = _extract("dlinear", small_prepared, tmp_path / "f16", dtype="float16")
    assert summary["status"] == "built"
    wide, narrow = _arrays(tmp_path / "f32" / "dlinear.zarr"), \
        _arrays(tmp_path / "f16" / "dlinear.zarr")
    for key, values in wide.items():
        assert narrow[key].dtype == np.float16
        np.testing.assert_allclose(narrow[key].astype(np.float32), values, rtol=1e-3, atol=1e-4)
    assert open_features(tmp_path / "f16" / "dlinear.zarr")[1]["dtype"] == "float16"
    with pytest.raises(CacheError, match="dtype"):  # a float32 cache is not reused silently
        _extract("dlinear", small_prepared, tmp_path / "f32", dtype="float16")


def test_values_beyond_float16_are_refused_and_the_shard_stays_unmarked(tmp_path):
    from pipeline.feature_cache import ArraySpec, CacheBuilder, write_shard

    builder = CacheBuilder(tmp_path / "x.zarr", {"backbone": "x"}, 8, [ArraySpec("features", (2,))],
                           shard_rows=8, dtype="float16")
    block = np.ones((8, 2), dtype=np.float32)
    block[3, 1] = 1e5
    with pytest.raises(CacheError, match="1e\\+05 does not fit float16.*dtype: float32"):
        write_shard(builder.store_path, builder.done_dir, 0, 0, {"features": block})
    assert builder.pending_shards() == [0]


def test_an_unknown_storage_dtype_is_refused():
    from pipeline.params import ParamsError

    with pytest.raises(ParamsError, match="float32 or float16"):
        BackboneParams(dtype="bfloat16")
