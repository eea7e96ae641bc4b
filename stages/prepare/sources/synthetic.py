"""The project's synthetic cohort is written in the MIMIC-IV-ECG layout, so it is read by the
very same adapter: the demo exercises the code path real archives take."""

from stages.prepare.sources import register
from stages.prepare.sources.mimic_iv_ecg import MimicIvEcg


@register("synthetic")
class Synthetic(MimicIvEcg):
    """`pipeline synth` output; identical reader, separate name in the cohort's source column."""
