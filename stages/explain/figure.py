"""Saliency drawn the way ECGs are read: 12 leads in the standard 3 x 4 layout with a lead II
rhythm strip on ECG paper (1 mm = 40 ms = 0.1 mV), attribution as colour under the trace,
and the median beat with P, QRS and T marked by the morphology expert, under the attribution
averaged over beats."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy.ndimage import uniform_filter1d

from stages.explain.attribution import Attribution

LAYOUT = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
ROW_MV = 3.0  # vertical distance between rows
SMOOTH_S = 0.02
PAPER, MAJOR, MINOR = "#fff5f5", "#f4a6a6", "#fbdcdc"


def _paper(ax, seconds: float, low: float, high: float) -> None:
    ax.set_facecolor(PAPER)
    for step, colour, width in ((0.04, MINOR, 0.3), (0.2, MAJOR, 0.6)):
        ax.vlines(np.arange(0, seconds + 1e-9, step), low, high, colors=colour, lw=width,
                  zorder=0)
    for step, colour, width in ((0.1, MINOR, 0.3), (0.5, MAJOR, 0.6)):
        ax.hlines(np.arange(np.floor(low), high + 1e-9, step), 0, seconds, colors=colour,
                  lw=width, zorder=0)
    ax.set_xlim(0, seconds)
    ax.set_ylim(low, high)
    ax.set_xticks([])
    ax.set_yticks([])


def _beat_profile(attribution: np.ndarray, peaks: np.ndarray, fs: int, before: int,
                  after: int) -> np.ndarray | None:
    """|attribution| summed over leads, averaged over beats around their R peaks."""
    total = np.abs(attribution).sum(axis=0)
    windows = [total[p - before: p + after] for p in peaks
               if p - before >= 0 and p + after <= len(total)]
    return np.mean(windows, axis=0) if windows else None


def draw(signal: np.ndarray, fs: int, leads: tuple[str, ...], explained: Attribution,
         title: str, path: Path, beat: tuple | None = None, peaks: np.ndarray | None = None
         ) -> None:
    """One PNG: ``signal`` (12, L) mV with ``explained``'s attributions (12, L) as colour,
    or, for feature contributions, the largest ones as bars."""
    seconds = signal.shape[1] / fs
    t = np.arange(signal.shape[1]) / fs
    fig = plt.figure(figsize=(18, 9.5), dpi=110)
    # fixed margins, not savefig's tight bounding box: that renders every figure twice (a
    # third of the explain stage's time); the side panels' gap holds their feature names
    grid = fig.add_gridspec(2, 2, width_ratios=[4.2, 1], height_ratios=[1, 1], wspace=0.16,
                            hspace=0.25, left=0.01, right=0.985, bottom=0.05, top=0.93)
    ax = fig.add_subplot(grid[:, 0])
    low, high = -4 * ROW_MV + 1.2, 1.6
    _paper(ax, seconds, low, high)
    per_sample = explained.values.ndim == 2
    if per_sample:
        smooth = uniform_filter1d(explained.values, max(1, round(SMOOTH_S * fs)), axis=1)
        scale = float(np.percentile(np.abs(smooth), 99.5)) or 1.0
    quarter = signal.shape[1] // 4
    for row, names in enumerate((*LAYOUT, ("II",) * 4)):
        offset = -row * ROW_MV
        for column, lead in enumerate(names):
            i = leads.index(lead)
            span = (slice(None) if row == 3 else
                    slice(column * quarter, (column + 1) * quarter))
            if per_sample:
                ax.imshow(smooth[i, span][None], aspect="auto", cmap="RdBu_r",
                          vmin=-scale, vmax=scale, alpha=0.6, zorder=1,
                          extent=(t[span][0], t[span][-1], offset - 1.3, offset + 1.3))
            ax.plot(t[span], signal[i, span] - np.median(signal[i]) + offset, color="black",
                    lw=0.7, zorder=2)
            if row < 3 or column == 0:
                ax.text(t[span][0] + 0.05, offset + 0.9, lead, fontsize=10, zorder=3)
    ax.set_title(title, fontsize=11, loc="left")
    _beat_panel(fig.add_subplot(grid[0, 1]), explained, fs, beat, peaks, leads)
    side = fig.add_subplot(grid[1, 1])
    if per_sample:
        share = np.abs(explained.values).sum(axis=1)
        side.barh(range(len(leads)), share / max(share.sum(), 1e-12), color="#c0392b")
        side.set_yticks(range(len(leads)), leads, fontsize=8)
        side.set_title("share of |attribution| per lead", fontsize=9)
    else:
        order = np.argsort(-np.abs(explained.values))[:12]
        colours = ["#c0392b" if explained.values[k] > 0 else "#2e6bbf" for k in order]
        side.barh(range(len(order)), explained.values[order], color=colours)
        side.set_yticks(range(len(order)), [explained.feature_names[k] for k in order],
                        fontsize=7)
        side.set_title("largest feature contributions (output units)", fontsize=9)
    side.invert_yaxis()
    side.tick_params(axis="x", labelsize=7)
    fig.savefig(path)
    plt.close(fig)


def _beat_panel(ax, explained: Attribution, fs: int, beat: tuple | None,
                peaks: np.ndarray | None, leads: tuple[str, ...]) -> None:
    """Lead II's median beat, its fiducials and (saliency) the beat-averaged attribution."""
    ax.set_title("median beat, lead II (morphology expert's fiducials)", fontsize=9)
    if beat is None:
        ax.text(0.5, 0.5, "too few beats to delineate", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    median, marks, before = beat
    ms = (np.arange(median.shape[1]) - before) * 1000 / fs
    lead = median[leads.index("II")]
    ax.plot(ms, lead, color="black", lw=1)
    ax.axvspan(ms[marks["qrs_onset"]], ms[marks["qrs_offset"]], color="#f1c40f", alpha=0.3,
               label="QRS")
    if marks["p_onset"] is not None:
        ax.axvspan(ms[marks["p_onset"]], ms[marks["qrs_onset"]], color="#27ae60", alpha=0.2,
                   label="P + PR")
    t_end = min(marks["t_end"], len(ms) - 1)
    ax.axvspan(ms[min(marks["qrs_offset"], t_end)], ms[t_end], color="#8e44ad", alpha=0.12,
               label="ST + T")
    ax.axvline(ms[min(marks["t_peak"], len(ms) - 1)], color="#8e44ad", lw=0.8, ls=":")
    if explained.values.ndim == 2 and peaks is not None:
        profile = _beat_profile(explained.values, peaks, fs, before, median.shape[1] - before)
        if profile is not None:
            twin = ax.twinx()
            twin.fill_between(ms, profile, color="#c0392b", alpha=0.35, lw=0)
            twin.set_yticks([])
            twin.set_ylim(0, profile.max() * 1.1 or 1)
    ax.set_xlabel("ms from R", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper right")
