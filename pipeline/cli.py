"""The `pipeline` command: one sub-command per DVC stage (prepare -> extract -> fit -> report).

Every option left out falls back to params.yaml, so `dvc repro` and a hand-typed command run
the same configuration.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.params import ParamsError, load_params

app = typer.Typer(
    help="Multi-task ECG analysis with an ensemble of frozen foundation models.\n\n"
         "Stages: synth (demo data) -> prepare -> extract -> fit-ensemble -> report. "
         "Options you leave out are read from params.yaml (see README).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

ParamsOption = Annotated[Path, typer.Option("--params", help="params.yaml to read defaults from.")]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _params(path: Path):
    try:
        return load_params(path)
    except ParamsError as err:
        _fail(str(err))


@app.command()
def synth(
    out: Annotated[Path | None, typer.Option(help="Folder to write the cohort to "
                                             "(replaced atomically).")] = None,
    n: Annotated[int | None, typer.Option(help="Number of ECGs.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed; same seed, same files.")] = None,
    workers: Annotated[int, typer.Option(help="Local dask worker processes (0: in-process).")] = 0,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Write a synthetic cohort in the MIMIC-IV-ECG layout, for the demo and tests.

    Writes WFDB files, record_list.csv, machine_measurements.csv, hosp/patients.csv and
    hosp/labevents.csv, plus truth.csv: the labels the generator intended.
    """
    from stages.prepare.synthetic.cohort import write_cohort

    p = _params(params).synth
    out, n, seed = out or Path(p.out), n or p.n, p.seed if seed is None else seed
    truth = write_cohort(out, n=n, seed=seed, workers=workers)
    typer.echo(f"wrote {len(truth)} ECGs of {truth['subject_id'].nunique()} subjects to {out}")


@app.command()
def prepare(
    source: Annotated[str | None, typer.Option(help="Source adapter: mimic-iv-ecg, synthetic, "
                                               "challenge, ptb-xl, code15, folder "
                                               "(default: params data.source).")] = None,
    root: Annotated[Path | None, typer.Option(help="Folder of the archive.")] = None,
    labels: Annotated[Path | None, typer.Option(help="Label tables: for mimic-iv-ecg the "
                                                "MIMIC-IV folder holding hosp/; for folder "
                                                "the CSV/Parquet labels table.")] = None,
    option: Annotated[list[str] | None, typer.Option(help="Source option KEY=VALUE, e.g. "
                                                     "folds=recommended or rate=100 for "
                                                     "ptb-xl; repeatable.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder for cohort.parquet and "
                                             "signals.h5 (replaced atomically).")] = None,
    workers: Annotated[int | None, typer.Option(help="Local dask worker processes "
                                                "(0: in-process).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Address of a dask.distributed "
                                                  "scheduler; workers must see --root.")] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Read one or more archives into one labelled, subject-split cohort and signal store.

    Writes OUT/cohort.parquet, OUT/signals.h5 (N x 12 x L, mV, standard lead order),
    OUT/prepare_summary.json and OUT/skipped.csv. Bad records are repaired or skipped with
    a reason; an interrupted run leaves OUT as it was. Several archives: list them under
    data.sources in params.yaml.
    """
    from stages.prepare.records import RecordError
    from stages.prepare.run import SourceSpec, prepare_sources
    from stages.prepare.sources import SourceError
    from stages.prepare.summary import print_summary

    cfg = _params(params)
    step = cfg.prepare
    if workers is not None:
        step.workers = workers
    data = cfg.data
    options = dict(data.options)
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"--option {item!r}: use KEY=VALUE")
        options[key.strip()] = value.strip()
    if data.sources and not (source or root):
        specs = [SourceSpec(s["source"], Path(s["root"]),
                            Path(s["labels"]) if s.get("labels") else None,
                            dict(s.get("options") or {})) for s in data.sources]
    else:
        label_path = labels or (Path(data.labels) if data.labels else None)
        specs = [SourceSpec(source or data.source, root or Path(data.root), label_path,
                            options)]
    try:
        summary = prepare_sources(specs, out or Path(step.out), step, scheduler=scheduler)
    except (SourceError, RecordError, ValueError, KeyError) as err:
        _fail(str(err))
    print_summary(summary)


@app.command()
def extract(
    backbone: Annotated[str, typer.Option(help="Backbone to run: a key of `backbones:` in "
                                          "params.yaml (moment, timesnet, dlinear, gate).")],
    weights: Annotated[str | None, typer.Option(help="Hub id or local path of the weights, "
                                                "or `random` (default: params).")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda[:N] "
                                               "(auto picks a GPU when present).")] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16",
                                              help="bf16 autocast on GPU.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="ECGs per forward pass.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if a cache (complete or "
                                        "partial) made from other settings exists.")] = False,
    workers: Annotated[int | None, typer.Option(help="Local dask worker processes "
                                                "(0: in-process).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Address of a dask.distributed "
                                                  "scheduler; workers must see cache/ and "
                                                  "the signal store.")] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Run a frozen backbone once over the prepared ECGs into cache/BACKBONE.zarr.

    Resumable: an interrupted run continues at the first unfinished shard. A cache made
    from other weights, cohort, input contract or code is refused unless --force.
    """
    from pipeline.feature_cache import CacheError
    from pipeline.params import BackboneParams
    from pipeline.signal_store import SignalStoreError
    from stages.extract.backbones import WeightsError
    from stages.extract.run import extract as run_extract

    cfg = _params(params)
    section = cfg.backbones.get(backbone, BackboneParams())
    if weights is not None:
        section.weights = weights
    if batch_size is not None:
        section.batch_size = batch_size
    settings = cfg.extract
    for name, value in (("device", device), ("bf16", bf16), ("workers", workers)):
        if value is not None:
            setattr(settings, name, value)
    try:
        summary = run_extract(backbone, section, settings, Path(cfg.prepare.out), force=force,
                              scheduler=scheduler)
    except (CacheError, SignalStoreError, WeightsError, ValueError, RuntimeError) as err:
        _fail(str(err))
    weights_note = {"random": "RANDOM weights (demo)", "loaded": "loaded weights",
                    "none": "no weights"}[summary["weights"]]
    rate = f", {summary['ecg_per_s']} ECG/s" if summary.get("ecg_per_s") else ""
    typer.echo(f"{backbone}: {summary['status']} - {summary['rows']} rows at "
               f"{summary['path']} ({weights_note}, digest {summary['weights_digest']}, "
               f"{summary['device']}{rate})")
    if "failed_rows" in summary:
        typer.echo(f"{backbone}: no measurement (too few beats, flat or noise) on "
                   f"{summary['failed_rows']} of {summary['rows']} ECGs; their rows are zeros")


@app.command("fit-ensemble")
def fit_ensemble(
    task: Annotated[str, typer.Option(help="rr | age | sex | ka | ad, or all: one multi-task "
                                      "model for the tasks of params `tasks:`, compared "
                                      "with the single-task fits in metrics/.")],
    backbones: Annotated[str | None, typer.Option(help="Comma-separated experts (default: "
                                                  "params fit.backbones).")] = None,
    seeds: Annotated[int | None, typer.Option(help="Number of seeds (fresh model and "
                                              "optimiser each).")] = None,
    adapter: Annotated[str | None, typer.Option(help="lora (EnECG) | full")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda[:N] (default: params "
                                               "fit.device; auto picks a GPU when present)."
                                               )] = None,
    bf16: Annotated[bool | None, typer.Option(
        "--bf16/--no-bf16", help="bf16 autocast for the heads and gates (default: params "
        "fit.bf16); for a GPU, it gained little on a CPU.")] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Train the experts' LoRA heads and the MoE gate for one task from cached features.

    Every head of the fit (experts x cross-fitting folds x seeds) trains in one batched
    pass over the cached rows, on the CPU or a GPU (`--device`).

    Writes metrics/TASK.json (ensemble and baselines, mean ± std over seeds),
    predictions/TASK.parquet (test split) and models/TASK/. A task without labels in the
    cohort is reported and skipped.

    With `--task all`: one multi-task model (per expert a head whose trunk every task
    shares), cross-fitted like the single-task heads, each task's combiner chosen as in
    its own fit; writes metrics/multitask.json (no model file).
    """
    from pipeline.device import resolve_device
    from pipeline.feature_cache import CacheError
    from pipeline.params import TASKS
    from stages.fit.run import TaskSkipped, fit_task, write_skipped
    from stages.fit.summary import print_fit

    if task not in (*TASKS, "all"):
        _fail(f"unknown task {task!r}; choose one of {', '.join(TASKS)} or all")
    cfg = _params(params)
    fit = cfg.fit
    if backbones:
        fit.backbones = [b.strip() for b in backbones.split(",") if b.strip()]
    if seeds is not None:
        fit.seeds = seeds
    if adapter is not None:
        fit.adapter = adapter
    if device is not None:
        fit.device = device
    if bf16 is not None:
        fit.bf16 = bf16
    try:
        resolve_device(fit.device)
    except RuntimeError as err:
        _fail(str(err))
    if task == "all":
        _fit_all(fit, Path(cfg.prepare.out) / "cohort.parquet", Path(cfg.extract.out),
                 cfg.tasks)
        return
    try:
        result = fit_task(task, fit, Path(cfg.prepare.out) / "cohort.parquet",
                          Path(cfg.extract.out))
    except TaskSkipped as reason:
        write_skipped(task, str(reason), fit)
        typer.secho(f"{task}: skipped - {reason}", fg=typer.colors.YELLOW)
        return
    except (CacheError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    result.write(fit)
    print_fit(result.metrics)


def _fit_all(fit, cohort: Path, cache: Path, tasks: list[str]) -> None:
    from pipeline.feature_cache import CacheError
    from stages.fit.multitask import compare_with_single_task, fit_multitask
    from stages.fit.run import write_metrics
    from stages.fit.summary import print_multitask

    try:
        result = compare_with_single_task(fit_multitask(fit, cohort, cache, tasks),
                                          fit.metrics)
    except (CacheError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    write_metrics(Path(fit.metrics) / "multitask.json", result)
    print_multitask(result)


@app.command()
def compare(params: ParamsOption = Path("params.yaml")) -> None:
    """Fit the ensemble of every variant in params.yaml `variants:` for every task.

    Each variant overrides `fit:` (e.g. adds the rhythm and morphology experts, or makes
    the gate phase-aware); results go to metrics/variants.json and into the report.
    """
    from pipeline.feature_cache import CacheError
    from stages.fit.compare import compare_variants
    from stages.fit.run import write_metrics
    from stages.fit.summary import print_variants

    cfg = _params(params)
    try:
        result = compare_variants(cfg.fit, cfg.variants, cfg.tasks,
                                  Path(cfg.prepare.out) / "cohort.parquet", Path(cfg.extract.out))
    except (CacheError, FileNotFoundError, ValueError, TypeError) as err:
        _fail(str(err))
    write_metrics(Path(cfg.fit.metrics) / "variants.json", result)
    print_variants(result)


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="Folder to write the bundle to (replaced "
                                      "atomically).")],
    task: Annotated[str, typer.Option(help="A task of params `tasks:`, or all.")] = "all",
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Write a trained ensemble as a portable model bundle for `pipeline predict`.

    The bundle holds each task's saved models (every seed), its metrics, the backbones'
    fingerprints and how to rebuild their features, the prepare settings, and a model
    card. Backbone weights are referenced, not copied.
    """
    from stages.predict.bundle import BundleError, export_bundle, skipped_tasks

    cfg = _params(params)
    tasks = list(cfg.tasks) if task == "all" else [task]
    if task == "all":  # a task the fit stage skipped (no labels) is left out, and said so
        for name, reason in skipped_tasks(tasks, cfg).items():
            typer.secho(f"{name}: not exported - the fit stage skipped it ({reason})",
                        fg=typer.colors.YELLOW)
            tasks.remove(name)
    try:
        manifest = export_bundle(tasks, cfg, out)
    except BundleError as err:
        _fail(str(err))
    typer.echo(f"wrote {out}: {', '.join(manifest['tasks'])} "
               f"({len(manifest['backbones'])} backbones referenced); see {out}/MODEL_CARD.md")


@app.command()
def predict(
    model: Annotated[Path, typer.Option(help="Model bundle folder (`pipeline export`).")],
    root: Annotated[Path, typer.Option(help="Folder of the new ECGs.")],
    out: Annotated[Path, typer.Option(help="Parquet file of predictions (one row per "
                                      "readable record).")],
    source: Annotated[str, typer.Option(help="Source adapter of --root: challenge, "
                                        "mimic-iv-ecg, ptb-xl, code15, folder, "
                                        "synthetic.")] = "folder",
    labels: Annotated[Path | None, typer.Option(help="Label tables, as for `prepare`; with "
                                                "labels, metrics go to OUT.metrics.json.")] = None,
    option: Annotated[list[str] | None, typer.Option(help="Source option KEY=VALUE "
                                                     "(repeatable), as for `prepare`.")] = None,
    weights: Annotated[list[str] | None, typer.Option(help="BACKBONE=PATH: where this machine "
                                                      "keeps a backbone's weights (checked "
                                                      "against the bundle's digest).")] = None,
    seed: Annotated[int | None, typer.Option(help="Which saved seed's model to use "
                                             "(default: the first).")] = None,
    work: Annotated[Path | None, typer.Option(help="Work folder for prepared signals and "
                                              "features (default: cache/predict/<id>); a "
                                              "repeated call reuses it.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
) -> None:
    """Run a trained ensemble on new ECGs: every task of the bundle in one call.

    Conforms the ECGs as `prepare` does (bad records are skipped and listed), runs each
    frozen backbone once (refused if its weights or config differ from the bundle's),
    then the heads and the gate. Per ECG: each task's prediction (value; class and
    probabilities; or decision at the validated threshold with its score), every
    expert's own prediction, the gate weights and the repairs applied.
    """
    from pipeline.feature_cache import CacheError
    from pipeline.signal_store import SignalStoreError
    from stages.extract.backbones import WeightsError
    from stages.predict.bundle import BundleError
    from stages.predict.run import metrics_path, run_predict
    from stages.prepare.records import RecordError
    from stages.prepare.sources import SourceError

    for item in [*(weights or []), *(option or [])]:
        if "=" not in item:
            _fail(f"{item!r}: use KEY=VALUE")
    pairs = dict(item.split("=", 1) for item in weights or [])
    options = dict(item.split("=", 1) for item in option or [])
    try:
        summary = run_predict(model, source, root, out, labels=labels, work=work,
                              weights=pairs, seed=seed, device=device, options=options)
    except (BundleError, CacheError, WeightsError, SourceError, RecordError,
            SignalStoreError, ValueError, RuntimeError, FileNotFoundError) as err:
        _fail(str(err))
    for record in summary["skipped"]:
        typer.secho(f"skipped {record['record_id']}: {record['reason']}",
                    fg=typer.colors.YELLOW)
    reused = [b for b, status in summary["extract"].items() if status == "up to date"]
    built = [b for b in summary["extract"] if b not in reused]
    parts = ([f"reused cached features of {', '.join(reused)}"] if reused else []) + (
        [f"computed {', '.join(built)}"] if built else [])
    typer.echo(f"prepare: {summary['prepare']}; features: {'; '.join(parts)}")
    n_skipped = len(summary["skipped"])
    typer.echo(f"wrote {summary['records']} predictions ({n_skipped} record"
               f"{'' if n_skipped == 1 else 's'} skipped) to {out} in {summary['seconds']} s")
    for task, m in summary["metrics"].items():
        typer.echo(f"{task}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()
                                           if isinstance(v, float)) + f" (n={m['n']})")
    if summary["metrics"]:
        typer.echo(f"metrics: {metrics_path(out)}")


@app.command()
def explain(
    model: Annotated[Path, typer.Option(help="Model bundle folder (`pipeline export`).")],
    out: Annotated[Path, typer.Option(help="Folder for the figures, arrays and "
                                      "explain.json (replaced atomically).")],
    record: Annotated[list[str] | None, typer.Option(help="Record id to explain "
                                                     "(repeatable).")] = None,
    top: Annotated[int, typer.Option(help="Also explain each task's N test ECGs with the "
                                     "largest errors (fit stage's predictions).")] = 0,
    task: Annotated[list[str] | None, typer.Option(help="Task(s) to explain (default: all "
                                                   "of the bundle).")] = None,
    root: Annotated[Path | None, typer.Option(help="New ECGs to take --record from, "
                                              "prepared as `predict` does (default: the "
                                              "training cohort of params prepare.out).")] = None,
    source: Annotated[str, typer.Option(help="Source adapter of --root.")] = "folder",
    labels: Annotated[Path | None, typer.Option(help="Label tables of --root, as for "
                                                "`prepare` (the folder source's record "
                                                "list).")] = None,
    option: Annotated[list[str] | None, typer.Option(help="Source option KEY=VALUE of "
                                                     "--root (repeatable).")] = None,
    weights: Annotated[list[str] | None, typer.Option(help="BACKBONE=PATH, as for "
                                                      "`predict`.")] = None,
    seed: Annotated[int | None, typer.Option(help="Saved seed's model (default: the "
                                             "first).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Integrated-gradient saliency of each expert and of the gated ensemble on ECGs.

    Attributions are taken with respect to the raw 12-lead record, through each frozen
    backbone, its input contract and its head. Writes a PNG per expert on the 12-lead
    layout (attribution as colour under the trace; median beat with P, QRS and T), the
    attributions as .npz, and explain.json with each completeness gap (kept under 5 %).
    Rhythm and morphology experts are not differentiable: their feature contributions
    are shown instead.
    """
    from pipeline.device import resolve_device
    from pipeline.feature_cache import CacheError
    from stages.explain.run import run_explain
    from stages.extract.backbones import WeightsError
    from stages.predict.bundle import Bundle, BundleError
    from stages.predict.run import default_work, prepare_new_ecgs
    from stages.prepare.records import RecordError
    from stages.prepare.sources import SourceError

    cfg = _params(params)
    for item in [*(weights or []), *(option or [])]:
        if "=" not in item:
            _fail(f"{item!r}: use KEY=VALUE")
    pairs = dict(item.split("=", 1) for item in weights or [])
    options = dict(item.split("=", 1) for item in option or [])
    if root is not None and top:
        _fail("--top ranks the fit stage's test predictions; with --root pass --record")
    try:
        if root is not None:
            prepared, _ = prepare_new_ecgs(Bundle.load(model), source, root, labels, options,
                                           default_work(source, root, model))
            predictions = None
        else:
            prepared, predictions = Path(cfg.prepare.out), Path(cfg.fit.predictions)
        summary = run_explain(model, prepared, out, record, top, predictions, task, seed,
                              pairs, Path(cfg.extract.out), str(resolve_device(device)))
    except (BundleError, CacheError, WeightsError, SourceError, RecordError, ValueError,
            FileNotFoundError, RuntimeError) as err:
        _fail(str(err))
    for name, records in summary.items():
        for rec, entries in records.items():
            gaps = [e["completeness_gap"] for e in entries.values()
                    if e["method"] == "integrated gradients"]
            typer.echo(f"{name} {rec}: {len(entries)} figures, largest completeness gap "
                       f"{100 * max(gaps):.2f} %")
            if max(gaps) >= 0.05:
                typer.secho(f"warning: {name} {rec}: a gap of 5 % or more remained at the "
                            "most steps; the output jumps along the path (e.g. Time-MoE's "
                            "sparse routing), so these attributions are incomplete",
                            fg=typer.colors.YELLOW)
    typer.echo(f"wrote {out}")


@app.command()
def report(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Folder for summary.md and plots/.")] = Path("reports"),
) -> None:
    """Summarise the metrics of params.yaml's `tasks:` into reports/summary.md with plots."""
    from stages.report.summary import write_report

    loaded = _params(params)
    try:
        path = write_report(Path(loaded.fit.metrics), Path(loaded.fit.predictions), out,
                            loaded.tasks)
    except ValueError as err:
        _fail(str(err))
    typer.echo(f"wrote {path}")


def main() -> None:
    sys.exit(app())
