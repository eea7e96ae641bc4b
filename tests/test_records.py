import numpy as np
import pytest
import wfdb

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


def _via_wfdb(stem):
    record = wfdb.rdrecord(str(stem))
    scale = [1e-3 if u.lower() == "uv" else 1.0 for u in record.units]
    return record.p_signal * np.array(scale), record.fs, record.sig_name


def test_fast_path_equals_wfdb_on_written_records(tmp_path):
    signal = leads_signal(5000, 500, list(STANDARD_LEADS))
    signal[5:9, 2] = np.nan
    stem = write_record(tmp_path, "f", signal, 500, list(STANDARD_LEADS), gain=1000.0)
    raw = read_wfdb(stem)
    expected, fs, names = _via_wfdb(stem)
    np.testing.assert_array_equal(raw.signal, expected)
    assert (raw.fs, raw.lead_names) == (fs, names)


def test_other_formats_fall_back_to_wfdb(tmp_path):
    signal = leads_signal(1000, 250, ["I", "II"])
    digital = np.round(signal * 200).astype(np.int16)
    wfdb.wrsamp("f212", fs=250, units=["mV", "mV"], sig_name=["I", "II"], d_signal=digital,
                fmt=["212", "212"], adc_gain=[200.0, 200.0], baseline=[0, 0],
                write_dir=str(tmp_path))
    raw = read_wfdb(tmp_path / "f212")
    np.testing.assert_allclose(raw.signal, digital / 200.0)
    dat = tmp_path / "f212.dat"
    dat.write_bytes(dat.read_bytes()[:100])
    with pytest.raises(RecordError, match="truncated signal file: f212.dat has 100 of 3000"):
        read_wfdb(tmp_path / "f212")


def test_fast_path_equals_wfdb_on_real_challenge_records(shared_dir):
    folder = shared_dir / "data" / "cinc2021-sample"
    stems = sorted({p.with_suffix("") for p in folder.glob("*.hea")})
    assert len(stems) == 50
    for stem in stems:
        raw = read_wfdb(stem)
        expected, fs, names = _via_wfdb(stem)
        np.testing.assert_array_equal(raw.signal, expected, err_msg=stem.name)
        assert (raw.fs, raw.lead_names) == (fs, names)
