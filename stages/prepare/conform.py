"""Bring a raw record to the store's contract: standard lead order, one rate, one length.

Repairs are exact or conservative and always reported; anything else is a skip with a reason.

* leads are matched by name (case-insensitive), never by position;
* missing limb leads are derived exactly from any two of I, II, III;
* missing precordial leads (at most ``max_imputed_leads``) are interpolated by electrode
  position from the nearest recorded neighbours (an approximation, flagged as ``imputed``;
  ``precordial="skip"`` drops such records instead);
* a lead that is flat or mostly NaN counts as missing; short NaN gaps are interpolated;
* another sampling rate is resampled with a polyphase anti-aliasing filter;
* a longer record keeps its first ``seconds``; a shorter one is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy.signal import resample_poly

from pipeline.leads import LIMB_LEADS, canonical_lead, derive_limb_leads
from pipeline.signal_store import SignalContract
from stages.prepare.records import RawRecord, RecordError


@dataclass(frozen=True)
class RepairPolicy:
    """Limits of what may be repaired rather than skipped."""

    max_nan_fraction: float = 0.05
    flat_std_mv: float = 1e-4
    rate_tolerance_hz: float = 0.5
    precordial: str = "impute"  # impute | skip
    max_imputed_leads: int = 3


def conform(raw: RawRecord, contract: SignalContract,
            policy: RepairPolicy = RepairPolicy()) -> tuple[np.ndarray, list[str]]:
    """Return ((12, L) float32 mV, repairs) or raise RecordError naming why not."""
    repairs: list[str] = []
    leads = _by_name(raw)
    raw_names = set(leads)
    leads = _drop_unusable(leads, policy, repairs)
    dropped = [name for name in contract.leads if name in raw_names and name not in leads]
    missing_limb = [name for name in LIMB_LEADS if name not in leads]
    if missing_limb:
        limb = {k: v for k, v in leads.items() if k in LIMB_LEADS}
        try:
            leads.update(derive_limb_leads(limb))
        except ValueError as err:
            raise RecordError(f"missing leads: {_named(missing_limb, dropped)} ({err})") from err
        repairs.append(f"derived {','.join(missing_limb)}")
    missing = [name for name in contract.leads if name not in leads]
    if missing and policy.precordial == "impute" and all(m in PRECORDIAL for m in missing) \
            and len(missing) <= policy.max_imputed_leads and len(missing) < len(PRECORDIAL):
        leads.update(_impute_precordial(leads, missing))
        repairs.append(f"imputed {','.join(missing)} from neighbouring precordial leads")
        missing = []
    if missing:
        raise RecordError(f"missing leads: {_named(missing, dropped)}")
    signal = np.stack([leads[name] for name in contract.leads])
    signal = _to_rate(signal, raw.fs, contract.fs, policy, repairs)
    n = contract.n_samples
    if signal.shape[1] < n:
        raise RecordError(
            f"too short: {signal.shape[1] / contract.fs:.2f} s < {contract.seconds:g} s"
        )
    if signal.shape[1] > n:
        seconds = signal.shape[1] / contract.fs
        repairs.append(f"cropped {seconds:.2f}s to first {contract.seconds:g}s")
        signal = signal[:, :n]
    return signal.astype(np.float32), repairs


PRECORDIAL = ("V1", "V2", "V3", "V4", "V5", "V6")


def _impute_precordial(leads: dict[str, np.ndarray], missing: list[str]
                       ) -> dict[str, np.ndarray]:
    """Linear interpolation along V1..V6 between the nearest recorded leads on each side."""
    present = [i for i, name in enumerate(PRECORDIAL) if name in leads]
    out = {}
    for name in missing:
        i = PRECORDIAL.index(name)
        below = [j for j in present if j < i]
        above = [j for j in present if j > i]
        if below and above:
            lo, hi = below[-1], above[0]
            w = (i - lo) / (hi - lo)
            out[name] = (1 - w) * leads[PRECORDIAL[lo]] + w * leads[PRECORDIAL[hi]]
        else:
            out[name] = leads[PRECORDIAL[(below or above)[-1 if below else 0]]].copy()
    return out


def _named(missing: list[str], dropped: list[str]) -> str:
    flat = [name for name in missing if name in dropped]
    text = ",".join(missing)
    return f"{text} (flat or mostly NaN: {','.join(flat)})" if flat else text


def _by_name(raw: RawRecord) -> dict[str, np.ndarray]:
    leads: dict[str, np.ndarray] = {}
    for j, name in enumerate(raw.lead_names):
        canonical = canonical_lead(name)
        if canonical is None:
            continue
        if canonical in leads:
            raise RecordError(f"duplicate lead: {canonical}")
        leads[canonical] = np.asarray(raw.signal[:, j], dtype=np.float64)
    if not leads:
        raise RecordError(f"no standard leads: channel names {raw.lead_names}")
    return leads


def _drop_unusable(leads: dict[str, np.ndarray], policy: RepairPolicy,
                   repairs: list[str]) -> dict[str, np.ndarray]:
    kept: dict[str, np.ndarray] = {}
    for name, x in leads.items():
        bad = ~np.isfinite(x)
        if bad.mean() > policy.max_nan_fraction:
            continue
        if bad.any():
            idx = np.arange(x.size)
            x = x.copy()
            x[bad] = np.interp(idx[bad], idx[~bad], x[~bad])
            repairs.append(f"interpolated {int(bad.sum())} NaN in {name}")
        if np.std(x) < policy.flat_std_mv:
            continue
        kept[name] = x
    dropped = [name for name in leads if name not in kept]
    if dropped:
        repairs.append(f"unusable (flat or NaN) {','.join(dropped)}")
    return kept


def _to_rate(signal: np.ndarray, fs: float, target: int, policy: RepairPolicy,
             repairs: list[str]) -> np.ndarray:
    if not np.isfinite(fs) or fs <= 0:
        raise RecordError(f"invalid sampling rate: {fs}")
    if abs(fs - target) <= policy.rate_tolerance_hz:
        return signal
    ratio = Fraction(target) / Fraction(fs).limit_denominator(1000)
    repairs.append(f"resampled {fs:g}->{target} Hz")
    return resample_poly(signal, ratio.numerator, ratio.denominator, axis=1)
