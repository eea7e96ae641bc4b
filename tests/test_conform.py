import numpy as np
import pytest

from pipeline.leads import STANDARD_LEADS, derive_limb_leads
from pipeline.signal_store import SignalContract
from stages.prepare.conform import RepairPolicy, conform
from stages.prepare.records import RawRecord, RecordError, read_wfdb
from tests.conftest import leads_signal, write_record

CONTRACT = SignalContract(fs=500, n_samples=5000)
MIMIC_ORDER = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]


def _standard(n=5000, fs=500.0):
    return leads_signal(n, fs, list(STANDARD_LEADS))


def test_leads_are_reordered_by_name_not_position():
    signal = _standard()
    shuffled = [3, 0, 11, 5, 7, 1, 2, 10, 4, 6, 9, 8]
    names = [STANDARD_LEADS[j].upper() if j % 2 else STANDARD_LEADS[j] for j in shuffled]
    raw = RawRecord(signal[:, shuffled], 500.0, names)
    out, repairs = conform(raw, CONTRACT)
    np.testing.assert_allclose(out, signal.T, atol=1e-6)
    assert repairs == []


def test_mimic_lead_order_from_a_wfdb_file(tmp_path):
    signal = _standard()
    order = [STANDARD_LEADS.index(n) for n in MIMIC_ORDER]
    stem = write_record(tmp_path, "r1", signal[:, order], 500, MIMIC_ORDER)
    out, _ = conform(read_wfdb(stem), CONTRACT)
    np.testing.assert_allclose(out, signal.T, atol=0.5 / 200 + 1e-6)  # int16 at 200 adu/mV


@pytest.mark.parametrize("fs", [250, 1000])
def test_other_rates_are_resampled(fs):
    t = np.arange(int(10 * fs)) / fs
    sine = np.sin(2 * np.pi * 5 * t)[:, None] * np.linspace(0.5, 1.6, 12)[None, :]
    out, repairs = conform(RawRecord(sine, float(fs), list(STANDARD_LEADS)), CONTRACT)
    assert out.shape == (12, 5000)
    wave = np.sin(2 * np.pi * 5 * np.arange(5000) / 500)
    expected = wave[None, :] * np.linspace(0.5, 1.6, 12)[:, None]
    inner = slice(100, -100)  # polyphase filter edge effects
    np.testing.assert_allclose(out[:, inner], expected[:, inner], atol=2e-3)
    assert repairs == [f"resampled {fs}->500 Hz"]


def test_long_record_keeps_first_ten_seconds_and_short_is_skipped():
    signal = _standard(n=6000)
    out, repairs = conform(RawRecord(signal, 500.0, list(STANDARD_LEADS)), CONTRACT)
    np.testing.assert_allclose(out, signal[:5000].T, atol=1e-6)
    assert repairs[0].startswith("cropped 12.00s")
    with pytest.raises(RecordError, match="too short: 8.00 s"):
        conform(RawRecord(signal[:4000], 500.0, list(STANDARD_LEADS)), CONTRACT)


def test_short_nan_gap_is_interpolated():
    signal = _standard()
    signal[100:110, 7] = np.nan
    out, repairs = conform(RawRecord(signal, 500.0, list(STANDARD_LEADS)), CONTRACT)
    assert np.isfinite(out).all()
    assert repairs == ["interpolated 10 NaN in V2"]


def test_mostly_nan_precordial_lead_is_imputed_or_skipped_by_policy():
    signal = _standard()
    signal[:3000, 8] = np.nan
    raw = RawRecord(signal, 500.0, list(STANDARD_LEADS))
    out, repairs = conform(raw, CONTRACT)
    np.testing.assert_allclose(out[8], (signal[:, 7] + signal[:, 9]) / 2, atol=1e-5)
    assert repairs == ["unusable (flat or NaN) V3",
                       "imputed V3 from neighbouring precordial leads"]
    with pytest.raises(RecordError, match=r"missing leads: V3 \(flat or mostly NaN: V3\)"):
        conform(raw, CONTRACT, RepairPolicy(precordial="skip"))


def test_missing_precordial_leads_are_interpolated_by_position():
    signal = _standard()
    names = [n for n in STANDARD_LEADS if n not in ("V2", "V3", "V6")]
    keep = [STANDARD_LEADS.index(n) for n in names]
    out, repairs = conform(RawRecord(signal[:, keep], 500.0, names), CONTRACT)
    v1, v4, v5 = signal[:, 6], signal[:, 9], signal[:, 10]
    np.testing.assert_allclose(out[7], v1 + (v4 - v1) / 3, atol=1e-5)
    np.testing.assert_allclose(out[8], v1 + 2 * (v4 - v1) / 3, atol=1e-5)
    np.testing.assert_allclose(out[11], v5, atol=1e-6)  # at the edge: nearest lead
    assert repairs == ["imputed V2,V3,V6 from neighbouring precordial leads"]


def test_too_many_missing_precordial_leads_skip_the_record():
    signal = _standard()
    names = [n for n in STANDARD_LEADS if n not in ("V1", "V2", "V3", "V4")]
    keep = [STANDARD_LEADS.index(n) for n in names]
    with pytest.raises(RecordError, match="missing leads: V1,V2,V3,V4"):
        conform(RawRecord(signal[:, keep], 500.0, names), CONTRACT)


def test_missing_limb_leads_are_derived_exactly():
    i, ii = _standard()[:, 0], _standard()[:, 1]
    full = {"I": i, "II": ii, **derive_limb_leads({"I": i, "II": ii})}
    precordial = leads_signal(5000, 500.0, ["V"] * 6, seed=3)
    columns = [full[n] for n in ("I", "III")] + list(precordial.T)
    raw = RawRecord(np.stack(columns, axis=1), 500.0, ["I", "III", "V1", "V2", "V3", "V4",
                                                       "V5", "V6"])
    out, repairs = conform(raw, CONTRACT)
    for j, name in enumerate(STANDARD_LEADS[:6]):
        np.testing.assert_allclose(out[j], full[name], atol=1e-5)
    assert repairs == ["derived II,aVR,aVL,aVF"]


def test_a_flat_limb_lead_is_replaced_by_its_derivation():
    signal = _standard()
    limb = derive_limb_leads({"I": signal[:, 0], "II": signal[:, 1]})
    for name, values in limb.items():
        signal[:, STANDARD_LEADS.index(name)] = values
    expected = signal.T.copy()
    signal[:, STANDARD_LEADS.index("aVL")] = 0.0
    out, repairs = conform(RawRecord(signal, 500.0, list(STANDARD_LEADS)), CONTRACT)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert repairs == ["unusable (flat or NaN) aVL", "derived aVL"]


def test_duplicate_and_unknown_names():
    signal = _standard()
    names = list(STANDARD_LEADS)
    names[2] = "II"
    with pytest.raises(RecordError, match="duplicate lead: II"):
        conform(RawRecord(signal, 500.0, names), CONTRACT)
    with pytest.raises(RecordError, match="no standard leads"):
        conform(RawRecord(signal[:, :2], 500.0, ["ECG1", "ECG2"]), CONTRACT)


def test_microvolt_records_are_converted(tmp_path):
    signal = _standard()
    stem = write_record(tmp_path, "uv", signal * 1000, 500, list(STANDARD_LEADS), gain=1.0)
    header = stem.with_suffix(".hea")
    header.write_text(header.read_text().replace("/mV", "/uV"))
    out, _ = conform(read_wfdb(stem), CONTRACT)
    np.testing.assert_allclose(out, signal.T, atol=1e-3)
