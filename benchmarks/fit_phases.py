"""Benchmark (not a test): where a fit's time goes, and stage two against stage one.

On the demo cohort (data/prepared + cache/ after `make demo`) with the default ``fit:`` of
params.yaml, runs ``fit-ensemble`` for each task and prints the wall time of each part:

* heads: every expert's cross-fitted heads, all seeds, trained in one batched pass;
* probes: the cross-fitted linear probes (candidates and baselines);
* gate: the MoE gate's fits (selection folds and the one kept, of every split) and EnECG's
  sample-aware weight generators, trained in one pass;
* stacking: the stacker's fits;
* bootstrap: the subject-bootstrap intervals; writing: models, predictions, metrics;
* other: the rest (cheap candidates, scoring, the task's bookkeeping).

The heads are stored as ``dvc repro`` stores them, in a scratch store that starts empty,
so every task trains its own. With ``--all`` it then times ``fit-ensemble --task all`` and
``pipeline compare`` (which reads the fits' stored heads, as it does after the fit stages);
with ``--extract`` it also re-extracts every backbone of params.yaml into a scratch folder
and prints stage two's total over stage one's. Times are wall seconds on this machine;
compare them as ratios within one run.

    python benchmarks/fit_phases.py --tasks rr age sex ka ad --all --extract
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import stages.fit.run as run
import stages.fit.select as select
from pipeline.params import load_params
from stages.fit.compare import compare_variants
from stages.fit.multitask import fit_multitask

TIMES: dict[str, float] = defaultdict(float)


def _timed(owner: object, name: str, label: str) -> None:
    real = getattr(owner, name)

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            TIMES[label] += time.perf_counter() - started
    setattr(owner, name, wrapper)


def _instrument() -> None:
    _timed(run, "cross_fit", "heads")
    _timed(run, "cross_fit_probes", "probes")
    _timed(run, "fit_gates", "gate")
    _timed(run, "fit_stackers", "stacking")  # every split's, in prefit_splits
    _timed(select, "fit_stackers", "stacking")  # a stacker not fitted there
    _timed(run, "intervals", "bootstrap")
    _timed(run.FitResult, "write", "writing")


def _extraction_seconds(params_path: Path) -> float:
    from stages.extract.run import extract

    params = load_params(params_path)
    prepared = Path(params.prepare.out)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        settings = dataclasses.replace(params.extract, out=scratch)
        for name, section in params.backbones.items():
            extract(name, section, settings, prepared)
    return time.perf_counter() - started


def _row(label: str, work, phases: list[str]) -> float:
    """Run ``work`` and print its table row: seconds per phase, the rest, the total."""
    TIMES.clear()
    started = time.perf_counter()
    work()
    total = time.perf_counter() - started
    other = total - sum(TIMES[p] for p in phases)
    print(f"| {label} | " + " | ".join(f"{TIMES[p]:.1f}" for p in phases)
          + f" | {other:.1f} | {total:.1f} |", flush=True)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["rr", "age", "sex", "ka", "ad"])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--all", action="store_true",
                        help="also time `fit-ensemble --task all` and `pipeline compare`")
    parser.add_argument("--extract", action="store_true",
                        help="also time stage one (every backbone) for the ratio")
    args = parser.parse_args()
    params = load_params(args.params)
    cohort, cache = Path(params.prepare.out) / "cohort.parquet", Path(params.extract.out)
    if not cohort.exists():
        raise SystemExit(f"{cohort} is missing: run `make demo` (or `dvc repro`) first")
    _instrument()
    phases = ["heads", "probes", "gate", "stacking", "bootstrap", "writing"]
    print("| task | " + " | ".join(phases) + " | other | total s |")
    print("|---" * (len(phases) + 3) + "|")
    total_fit = 0.0
    with tempfile.TemporaryDirectory() as out:
        fit = params.fit
        fit.metrics, fit.models, fit.predictions = (str(Path(out) / d)
                                                    for d in ("m", "models", "p"))
        scratch = Path(out) / "cache"  # the features, with an empty head store beside them
        scratch.mkdir()
        for store in cache.glob("*.zarr"):
            (scratch / store.name).symlink_to(store.resolve())
        for task in args.tasks:
            total_fit += _row(task, lambda t=task: run.fit_task(t, fit, cohort, scratch).write(fit),
                              phases)
        print(f"| **fit-ensemble, {len(args.tasks)} task(s)** |" + " |" * (len(phases) + 1)
              + f" **{total_fit:.1f}** |")
        if args.all:
            total_fit += _row("fit-ensemble --task all", lambda: fit_multitask(
                fit, cohort, scratch, args.tasks), phases)
            total_fit += _row("compare", lambda: compare_variants(
                fit, params.variants, args.tasks, cohort, scratch), phases)
    if args.extract:
        stage_one = _extraction_seconds(args.params)
        print(f"extraction, {len(params.backbones)} backbone(s): {stage_one:.1f} s; "
              f"stage two ({total_fit:.1f} s) / stage one = {total_fit / stage_one:.2f}")


if __name__ == "__main__":
    main()
