import numpy as np
import pytest

from pipeline.leads import STANDARD_LEADS
from stages.prepare.records import RecordError, read_wfdb
from tests.conftest import leads_signal, write_record


@pytest.fixture
def record(tmp_path):
    return write_record(tmp_path, "rec", leads_signal(5000, 500, list(STANDARD_LEADS)), 500,
                        list(STANDARD_LEADS))


def test_reads_millivolts(record):
    raw = read_wfdb(record)
    assert raw.signal.shape == (5000, 12)
    assert raw.fs == 500
    assert raw.lead_names == list(STANDARD_LEADS)


def test_truncated_data_file_is_named(record):
    dat = record.with_suffix(".dat")
    dat.write_bytes(dat.read_bytes()[:24_000])
    with pytest.raises(RecordError, match=r"truncated signal file: rec.dat has 24000 of 120000"):
        read_wfdb(record)


def test_missing_data_file_is_named(record):
    record.with_suffix(".dat").unlink()
    with pytest.raises(RecordError, match="missing signal file: rec.dat"):
        read_wfdb(record)


def test_missing_and_unreadable_header(record, tmp_path):
    with pytest.raises(RecordError, match="missing header file: nope.hea"):
        read_wfdb(tmp_path / "nope")
    record.with_suffix(".hea").write_text("this is not a header\n")
    with pytest.raises(RecordError, match="unreadable header"):
        read_wfdb(record)


def test_wfdb_missing_samples_become_nan(tmp_path):
    signal = leads_signal(5000, 500, list(STANDARD_LEADS))
    signal[10:20, 3] = np.nan
    raw = read_wfdb(write_record(tmp_path, "nan", signal, 500, list(STANDARD_LEADS)))
    assert np.isnan(raw.signal[10:20, 3]).all()
    assert np.isfinite(np.delete(raw.signal, 3, axis=1)).all()
