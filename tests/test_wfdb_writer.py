import datetime as dt

import numpy as np
import wfdb

from stages.prepare.synthetic.wfdb_writer import write_format16


def test_fast_writer_matches_wfdb_byte_for_byte(tmp_path):
    digital = (np.random.default_rng(0).normal(size=(700, 12)) * 3000).astype(np.int16)
    names = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]
    when = dt.datetime(2182, 9, 22, 12, 4, 0)
    wfdb.wrsamp("rec", fs=500, units=["mV"] * 12, sig_name=names, d_signal=digital,
                fmt=["16"] * 12, adc_gain=[200.0] * 12, baseline=[0] * 12,
                write_dir=str(tmp_path), base_time=when.time(), base_date=when.date())
    (tmp_path / "ours").mkdir()
    write_format16(tmp_path / "ours", "rec", digital, 500, names, 200.0, when)
    for suffix in (".hea", ".dat"):
        assert (tmp_path / f"rec{suffix}").read_bytes() == \
            (tmp_path / "ours" / f"rec{suffix}").read_bytes()
    record = wfdb.rdrecord(str(tmp_path / "ours" / "rec"))
    np.testing.assert_array_equal(record.d_signal if record.d_signal is not None
                                  else np.round(record.p_signal * 200), digital)
