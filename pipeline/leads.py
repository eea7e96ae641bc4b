"""The standard 12-lead order and the name mapping every reader shares."""

from __future__ import annotations

import numpy as np

STANDARD_LEADS: tuple[str, ...] = (
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
)
LIMB_LEADS = STANDARD_LEADS[:6]

_CANONICAL = {name.lower(): name for name in STANDARD_LEADS}
_CANONICAL.update({"di": "I", "dii": "II", "diii": "III"})  # CODE-15% and other Brazilian sets


def canonical_lead(name: str) -> str | None:
    """Map a header's signal name ('AVR', 'v1', ' II ', 'DI') to the standard spelling."""
    return _CANONICAL.get(name.strip().lower())


def derive_limb_leads(limb: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Complete the six limb leads from any two of I, II, III (Einthoven and Goldberger).

    The six limb leads carry only two independent signals, so a record that lost some of
    them can be repaired exactly instead of being dropped. Returns only the leads that were
    missing; raises ValueError when fewer than two of I, II, III are present.
    """
    have = {k: v for k, v in limb.items() if k in ("I", "II", "III")}
    if "I" in have and "II" in have:
        lead_i, lead_ii = have["I"], have["II"]
    elif "I" in have and "III" in have:
        lead_i, lead_ii = have["I"], have["I"] + have["III"]
    elif "II" in have and "III" in have:
        lead_i, lead_ii = have["II"] - have["III"], have["II"]
    else:
        raise ValueError("fewer than two of leads I, II, III are present")
    full = {
        "I": lead_i,
        "II": lead_ii,
        "III": lead_ii - lead_i,
        "aVR": -(lead_i + lead_ii) / 2,
        "aVL": lead_i - lead_ii / 2,
        "aVF": lead_ii - lead_i / 2,
    }
    return {k: v for k, v in full.items() if k not in limb}
