"""The morphology expert against cardiologists' marks on five real LUDB ECGs (tests/data/ludb).

The whole database's figures are in the README ("Validated measurements"); these five
records keep a delineation or R-peak regression from passing unnoticed on a user's clone.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import wfdb

from stages.extract.backbones.morphology import morphology_features
from stages.extract.delineation_reference import FS, LEADS, reference, span_rr, waves
from stages.prepare.rpeaks import beat_sequence

LUDB = Path(__file__).parent / "data" / "ludb"
RECORDS = [LUDB / str(n) for n in range(1, 6)]


def test_the_fixtures_are_the_published_files():
    for line in (LUDB / "SHA256SUMS.txt").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((LUDB / name).read_bytes()).hexdigest() == digest, name
    assert len((LUDB / "SHA256SUMS.txt").read_text().splitlines()) == 5 * (2 + len(LEADS))


def test_annotations_give_physiological_reference_intervals():
    for record in RECORDS:
        kinds = {w[0] for lead in LEADS for w in waves(record, lead)}
        assert kinds == {"p", "qrs", "t"}
        ref = reference(record)
        assert 600 < ref["rr"] < 1500 and 100 < ref["pr"] < 220
        assert 60 < ref["qrs"] < 120 and 340 < ref["qt"] < 500
        extreme = reference(record, "extreme")  # earliest onset, latest offset: never shorter
        assert extreme["qrs"] >= ref["qrs"] and extreme["qt"] >= ref["qt"]


@pytest.mark.parametrize("interval,limit", [("rr", 4.5), ("pr", 10), ("qrs", 4.5), ("qt", 22)])
def test_the_morphology_expert_stays_within_todays_accuracy(interval, limit):
    """Mean absolute difference over the five records (ms). Today (2026-12-08): rr 3.92,
    pr 9.30, qrs 3.90, qt 20.80; the limits leave under 1.2 ms, less than a sample at
    500 Hz (the README gives the whole database's figures against IEC 60601-2-51)."""
    errors = []
    for record in RECORDS:
        signal = wfdb.rdrecord(str(record)).p_signal.T.astype(np.float64)
        ref = reference(record)
        peaks = beat_sequence(signal, FS)
        pr, qrs, qt = morphology_features(signal, peaks, FS)[1:4]
        measured = {"rr": span_rr(np.asarray(peaks), ref["span"]), "pr": pr, "qrs": qrs,
                    "qt": qt}
        errors.append(abs(float(measured[interval]) - ref[interval]))
    assert np.mean(errors) <= limit
