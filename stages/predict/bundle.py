"""A trained ensemble as one portable folder: what ``predict`` needs, nothing of the cohort.

Layout (``pipeline export``):

* ``bundle.json``: format, code version, date; the prepare settings new ECGs are conformed
  with; per backbone how its features are rebuilt (weights reference, seed, architecture,
  per-lead, storage dtype) and the fingerprint they must match (weights digest, config,
  input contract, code); per task its experts, their cached arrays, the gate's inputs and
  the seeds saved;
* ``<task>/seed<k>.pt``: the fit stage's model of that seed (heads, gate, chosen combiner,
  feature standardisation, target scaling, validated threshold, class names);
* ``<task>/metrics.json``: the fit stage's evaluation, intervals and baselines;
* ``MODEL_CARD.md``: the same in words.

Backbone weights are referenced, not copied (MOMENT-1-large alone is 1.4 GB); random demo
weights are rebuilt from their seed and checked against the digest like any other.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from pipeline import __version__
from pipeline.feature_cache import FEATURE_KEYS
from pipeline.params import BackboneParams, Params
from pipeline.staging import staged_dir
from stages.fit.model import Ensemble
from stages.fit.run import load_model
from stages.fit.tasks import TASKS

FORMAT = 1
MANIFEST, CARD = "bundle.json", "MODEL_CARD.md"
PREPARE_KEYS = ("fs", "seconds", "max_nan_fraction", "precordial", "max_imputed_leads")


class BundleError(RuntimeError):
    """A bundle is missing, incomplete, or cannot be made from what the fit stage left."""


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _task_entry(task: str, cfg: Params) -> tuple[dict, list[Path]]:
    """(bundle.json entry, seed files) of one fitted task."""
    metrics_path = Path(cfg.fit.metrics) / f"{task}.json"
    if not metrics_path.exists():
        raise BundleError(f"no {metrics_path}: run `pipeline fit-ensemble --task {task}` "
                          "(or `dvc repro`) before exporting")
    metrics = json.loads(metrics_path.read_text())
    if metrics.get("skipped"):
        raise BundleError(f"task {task} was skipped by the fit stage ({metrics['skipped']}); "
                          "export the others")
    seeds = sorted((Path(cfg.fit.models) / task).glob("seed*.pt"),
                   key=lambda p: int(p.stem.removeprefix("seed")))
    if not seeds:
        raise BundleError(f"no saved models under {Path(cfg.fit.models) / task}; re-run "
                          f"`pipeline fit-ensemble --task {task}`")
    entry = {"kind": metrics["kind"], "metric": metrics["metric"],
             "experts": metrics["backbones"], "inputs": metrics["inputs"],
             "gate_inputs": metrics["gate_inputs"], "classes": metrics.get("classes"),
             "seeds": [int(p.stem.removeprefix("seed")) for p in seeds]}
    return entry, seeds


def skipped_tasks(tasks: list[str], cfg: Params) -> dict[str, str]:
    """The tasks the fit stage skipped (no labels, too few subjects), with its reason."""
    out = {}
    for task in tasks:
        path = Path(cfg.fit.metrics) / f"{task}.json"
        if path.exists() and (reason := json.loads(path.read_text()).get("skipped")):
            out[task] = reason
    return out


def export_bundle(tasks: list[str], cfg: Params, out: Path) -> dict:
    """Write the bundle of ``tasks`` from the fit stage's outputs to ``out`` (swapped in
    whole); returns its manifest."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise BundleError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    if not tasks:
        raise BundleError("no task to export (the fit stage skipped every one)")
    entries, copies, fingerprints = {}, [], {}
    for task in tasks:
        entry, seeds = _task_entry(task, cfg)
        entries[task] = entry
        for path in seeds:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            for name, fp in saved["fingerprints"].items():
                if name in fingerprints and fingerprints[name] != fp:
                    raise BundleError(f"the saved models disagree on {name}'s features (fitted "
                                      "on different caches): re-run the fit stage")
                fingerprints[name] = fp
            copies.append((path, Path(task) / path.name))
        copies.append((Path(cfg.fit.metrics) / f"{task}.json", Path(task) / "metrics.json"))
    manifest = {
        "format": FORMAT, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": __version__, "git_commit": _git_commit(),
        "prepare": {k: getattr(cfg.prepare, k) for k in PREPARE_KEYS},
        "backbones": {name: _backbone_entry(name, fp, cfg.backbones.get(name))
                      for name, fp in fingerprints.items()},
        "tasks": entries,
    }
    with staged_dir(Path(out)) as tmp:
        for source, target in copies:
            (tmp / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tmp / target)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / CARD).write_text(model_card(manifest, {t: json.loads(
            (tmp / t / "metrics.json").read_text()) for t in tasks}))
    return manifest


def _backbone_entry(name: str, fp: dict, section: BackboneParams | None) -> dict:
    random = bool(fp.get("random_weights"))
    weights = "random" if random else (section.weights if section else None)
    return {"weights": weights, "seed": fp.get("weights_seed") or 0,
            "batch_size": section.batch_size if section else 32,
            "fingerprint": {k: fp.get(k) for k in FEATURE_KEYS}}


def model_card(manifest: dict, metrics: dict[str, dict]) -> str:
    lines = [f"# Model card: ECG ensemble ({', '.join(manifest['tasks'])})", "",
             f"Exported {manifest['created']} by pipeline {manifest['code_version']}"
             + (f" (commit {manifest['git_commit']})" if manifest.get("git_commit") else "")
             + ".", ""]
    random = [b for b, e in manifest["backbones"].items() if e["weights"] == "random"
              and e["fingerprint"]["random_weights"]]
    if random:
        lines += [f"**Random-weight backbones ({', '.join(random)}): a demo model, not a "
                  "clinical one.**", ""]
    prep = manifest["prepare"]
    lines += [f"Input: 12-lead ECGs resampled to {prep['fs']} Hz, first {prep['seconds']:g} s; "
              f"missing precordial leads: {prep['precordial']}.", "",
              "| task | evaluation | ECGs (subjects) | sources | ensemble | 95% CI | "
              "trivial baseline | combiner |", "|---|---|---|---|---|---|---|---|"]
    for task, m in metrics.items():
        key, ev = m["metric"], m["evaluation"]
        how = (f"{ev['folds']}-fold subject CV" if ev["mode"] == "cv"
               else "held-out test split (by subject)")
        ensemble = m["methods"]["ensemble"][key]
        trivial = next((v[key] for name, v in m["methods"].items()
                        if name.startswith("trivial") and v and v.get(key)), None)
        sources = ", ".join(f"{s} {n}" for s, n in m.get("sources", {}).items())
        chosen = ", ".join(f"{c} ×{n}" for c, n in m["combiner"]["chosen"].items())
        ci = ensemble.get("ci")
        interval = f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "n/a"
        baseline = f"{trivial['mean']:.3f}" if trivial else "n/a"
        lines.append(
            f"| {task} | {how} | {ev['n_evaluated']} ({ev['subjects']}) | {sources} | "
            f"{key} {ensemble['mean']:.3f} ± {ensemble['std']:.3f} over {len(m['seeds'])} "
            f"seeds | {interval} | {baseline} | {chosen} |")
    lines += ["", "Splits: train/val/test " + "; ".join(
        f"{t} {m['n']['train']}/{m['n']['val']}/{m['n']['test']}" for t, m in metrics.items())
        + " ECGs.", "", "Backbones (features are recomputed and checked against these):", ""]
    for name, e in manifest["backbones"].items():
        fp = e["fingerprint"]
        lines.append(f"* `{name}`: weights {e['weights'] or 'none'} (digest "
                     f"{fp['weights_digest']}), input {fp['contract']['length']} samples per "
                     f"lead, normalise {fp['contract']['normalise']}")
    lines += ["", "Intervals: subject bootstrap over the evaluated ECGs, 95 %. Each task's "
              "`metrics.json` holds every baseline."]
    if any(m["evaluation"]["mode"] == "cv" for m in metrics.values()):
        lines += ["", "Cross-validated tasks: the metrics estimate the fitting procedure, from "
                  "models that never saw the evaluated subjects; the exported model is that "
                  "procedure refitted on the cohort's own train/val split."]
    lines.append("")
    return "\n".join(lines)


@dataclass
class Bundle:
    """A bundle folder, read back; models are loaded on demand."""

    folder: Path
    manifest: dict

    @classmethod
    def load(cls, folder: Path) -> Bundle:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.exists():
            raise BundleError(f"{folder} is not a model bundle (no {MANIFEST}); make one "
                              "with `pipeline export --task all --out DIR`")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise BundleError(f"{folder}: bundle format {manifest.get('format')}, this "
                              f"pipeline reads format {FORMAT}")
        return cls(folder, manifest)

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def task(self, name: str) -> dict:
        return self.manifest["tasks"][name]

    def select(self, tasks: list[str] | None) -> list[str]:
        """``tasks`` checked against the bundle's (all of them when None)."""
        unknown = sorted(set(tasks or []) - set(self.tasks))
        if unknown:
            raise ValueError(f"the bundle has no model for {', '.join(unknown)} "
                             f"(it has {', '.join(self.tasks)})")
        return list(tasks or self.tasks)

    def backbone_params(self, name: str, weights: str | None = None) -> BackboneParams:
        """Extraction settings that rebuild the features the model was trained on."""
        entry = self.manifest["backbones"][name]
        fp = entry["fingerprint"]
        chosen = weights or entry["weights"] or "random"
        return BackboneParams(weights=chosen, seed=entry["seed"],
                              batch_size=entry["batch_size"], per_lead=fp["per_lead"],
                              dtype=fp["dtype"], model=dict(fp["model"]))

    def stores(self, task: str) -> list[str]:
        entry = self.task(task)
        return list(dict.fromkeys([*entry["experts"], *entry["gate_inputs"]]))

    def model(self, task: str, seed: int, fingerprints: dict[str, dict]
              ) -> tuple[Ensemble, dict]:
        path = self.folder / task / f"seed{seed}.pt"
        if not path.exists():
            raise BundleError(f"{path} is missing; the bundle has seeds "
                              f"{self.task(task)['seeds']} of {task}")
        return load_model(path, fingerprints)
