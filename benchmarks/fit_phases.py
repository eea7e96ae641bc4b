"""Benchmark (not a test): where a fit's time goes, and stage two against stage one.

On the demo cohort (data/prepared + cache/ after `make demo`) with the default ``fit:`` of
params.yaml, runs ``fit-ensemble`` for each task and prints the wall time of each part:

* heads: every expert's cross-fitted heads, all seeds, trained in one batched pass;
* probes: the cross-fitted linear probes (candidates and baselines);
* gate: the MoE gate's fits (selection folds and the one kept, one bank per seed);
* stacking: the stacker's fits; weight generator: EnECG's sample-aware weighting;
* bootstrap: the subject-bootstrap intervals; writing: models, predictions, metrics;
* other: the rest (cheap candidates, scoring, the task's bookkeeping).

With ``--extract`` it also re-extracts every backbone of params.yaml into a scratch folder
and prints the ratio of the fits' total to the extractions' (stage two / stage one). Times
are wall seconds on this machine; compare them as ratios within one run.

    python benchmarks/fit_phases.py --tasks rr age sex ka ad --extract
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
    _timed(run, "cross_fit_probe", "probes")
    _timed(select, "fit_weightings", "gate")
    _timed(select.Combiners, "_stacking", "stacking")
    _timed(run, "_weight_generator", "weight generator")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["rr", "age", "sex", "ka", "ad"])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--extract", action="store_true",
                        help="also time stage one (every backbone) for the ratio")
    args = parser.parse_args()
    params = load_params(args.params)
    cohort, cache = Path(params.prepare.out) / "cohort.parquet", Path(params.extract.out)
    if not cohort.exists():
        raise SystemExit(f"{cohort} is missing: run `make demo` (or `dvc repro`) first")
    _instrument()
    phases = ["heads", "probes", "gate", "stacking", "weight generator", "bootstrap",
              "writing"]
    print("| task | " + " | ".join(phases) + " | other | total s |")
    print("|---" * (len(phases) + 3) + "|")
    total_fit = 0.0
    with tempfile.TemporaryDirectory() as out:
        fit = params.fit
        fit.metrics, fit.models, fit.predictions = (str(Path(out) / d)
                                                    for d in ("m", "models", "p"))
        fit.head_store = False  # every head trained here, none read from cache/heads
        for task in args.tasks:
            TIMES.clear()
            started = time.perf_counter()
            run.fit_task(task, fit, cohort, cache).write(fit)
            total = time.perf_counter() - started
            total_fit += total
            other = total - sum(TIMES[p] for p in phases)
            print(f"| {task} | " + " | ".join(f"{TIMES[p]:.1f}" for p in phases)
                  + f" | {other:.1f} | {total:.1f} |", flush=True)
    print(f"\nfit-ensemble, {len(args.tasks)} task(s): {total_fit:.1f} s")
    if args.extract:
        stage_one = _extraction_seconds(args.params)
        print(f"extraction, {len(params.backbones)} backbone(s): {stage_one:.1f} s; "
              f"stage two / stage one = {total_fit / stage_one:.2f}")


if __name__ == "__main__":
    main()
