"""dvc.yaml's fit stages read the feature stores that params.yaml names, so `dvc repro`
re-runs a fit exactly when a cache it reads changes (both are kept by hand)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _stores(deps: list[str]) -> set[str]:
    return {Path(d).stem for d in deps if d.startswith("${extract.out}/") and d.endswith(".zarr")}


def test_the_fit_stages_depend_on_the_stores_params_yaml_names():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    fit = params["fit"]
    read = set(fit["backbones"]) | set(fit["gate_inputs"])
    assert _stores(stages["fit"]["do"]["deps"]) == read
    assert _stores(stages["fit-all"]["deps"]) == read
    variants = set(read)
    for overrides in params["variants"].values():
        variants |= set(overrides.get("backbones", fit["backbones"]))
        variants |= set(overrides.get("gate_inputs", fit["gate_inputs"]))
    assert _stores(stages["compare"]["deps"]) == variants
