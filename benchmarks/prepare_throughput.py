"""Benchmark (not a test): prepare throughput in records/s with 1 and 2 local dask workers.

Both runs read the same synthetic cohort in one process of this script, so their ratio is
meaningful on a shared, noisy machine; absolute numbers are for the README's hardware line.
Prints one line per figure.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from pipeline.params import PrepareParams
from stages.prepare.run import prepare
from stages.prepare.synthetic.cohort import write_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="records in the cohort")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "raw"
        started = time.perf_counter()
        write_cohort(root, n=args.n, seed=0)
        synth_s = time.perf_counter() - started
        print(f"synth: {args.n / synth_s:.0f} records/s ({args.n} records, {synth_s:.1f} s)")
        rates = {}
        for workers in args.workers:
            started = time.perf_counter()
            prepare("synthetic", root, Path(tmp) / f"out{workers}",
                    PrepareParams(workers=workers))
            seconds = time.perf_counter() - started
            rates[workers] = args.n / seconds
            print(f"prepare throughput ({workers} dask worker{'s' if workers > 1 else ''}): "
                  f"{rates[workers]:.0f} records/s ({seconds:.1f} s)")
        if len(rates) > 1:
            base = rates[args.workers[0]]
            for workers in args.workers[1:]:
                print(f"prepare speedup {workers} vs {args.workers[0]} workers: "
                      f"{rates[workers] / base:.2f}x")
    print(f"hardware: {platform.processor() or platform.machine()}, "
          f"{__import__('os').cpu_count()} cores, Python {platform.python_version()}")


if __name__ == "__main__":
    main()
