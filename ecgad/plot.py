"""The 12-lead ECG as a clinician reads it, with the model's anomaly map laid over it.

Layout: the standard 3x4 print (rows I/aVR/V1/V4, II/aVL/V2/V5, III/aVF/V3/V6; each column shows the 2.5 s of its
quarter of the first 10 s) plus a lead-II rhythm strip over the whole record, on ECG paper: 25 mm/s and 10 mm/mV, so
one 1 mm minor square is 0.04 s x 0.1 mV and a 5 mm major square 0.2 s x 0.5 mV, pink, with a 1 mV calibration
pulse at the start of each row. Keeping the real paper scale lets a cardiologist read amplitudes and intervals
off the picture as from a printout. Because the scale is fixed, the width grows with the duration (about an inch a
second); ``max_seconds`` cuts the rhythm strip there, so a server can bound the picture whatever the record's length.

Text is drawn literally: a title holds a record id chosen by whoever sent the record, and matplotlib would parse
``$...$`` in it as math (an error, or unbounded work, on a crafted id), so math-text parsing is off for every label.

The anomaly map (``(leads, samples)``, higher = more anomalous) is drawn as a heat band behind each trace, scaled
to the map's maximum over the record, so the eye goes to where the model could not restore the signal.

matplotlib is used through the object API with the Agg canvas only: no pyplot state, so plotting is safe in
worker threads and servers without a display.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ecgad.atomic import atomic_file
from ecgad.types import LEADS, Scores

#: The print's lead grid: rows top to bottom, columns left to right.
LAYOUT: tuple[tuple[str, ...], ...] = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"),
                                       ("III", "aVF", "V3", "V6"))
RHYTHM_LEAD = "II"

PAPER_SPEED_MM_S = 25.0     # mm per second
GAIN_MM_MV = 10.0           # mm per millivolt
ROW_HEIGHT_MV = 3.0         # vertical room per row (30 mm)
PRINT_SECONDS = 10.0        # the 3x4 grid covers the first 10 s
CAL_SECONDS = 0.4           # left margin holding the 1 mV calibration pulse
MINOR_S, MINOR_MV = 0.04, 0.1
MAJOR_S, MAJOR_MV = 0.2, 0.5
GRID_MINOR_COLOR, GRID_MAJOR_COLOR = "#f7c6c6", "#e8817f"
TRACE_COLOR = "black"
HEAT_CMAP = "YlOrRd"
HEAT_MAX_ALPHA = 0.6
MM_PER_INCH = 25.4
MARGIN_IN, TITLE_IN = 0.25, 0.45


def verdict_title(name: str, scores: Scores) -> str:
    """The title of a scored record's plot: its name, score, label and threshold (the CLI's ``--plot`` and the
    service's ``/v1/score/plot`` draw the same)."""
    label = "anomalous" if scores.pred_label else "normal"
    threshold = f"{scores.threshold:.4g}" if math.isfinite(scores.threshold) else "not calibrated"
    return f"{name}: score {scores.pred_score:.4g} ({label}, threshold {threshold})"


def _draw_paper(ax, t0: float, t1: float, y0: float, y1: float) -> None:
    """Pink minor (1 mm) and major (5 mm) grid lines over [t0, t1] x [y0, y1] (seconds x millivolts)."""
    for step, color, width in ((MINOR_S, GRID_MINOR_COLOR, 0.3), (MAJOR_S, GRID_MAJOR_COLOR, 0.7)):
        ax.vlines(np.arange(np.ceil(t0 / step) * step, t1 + 1e-9, step), y0, y1, colors=color, linewidths=width,
                  zorder=0)
    for step, color, width in ((MINOR_MV, GRID_MINOR_COLOR, 0.3), (MAJOR_MV, GRID_MAJOR_COLOR, 0.7)):
        ax.hlines(np.arange(np.ceil(y0 / step) * step, y1 + 1e-9, step), t0, t1, colors=color, linewidths=width,
                  zorder=0)


def _draw_segment(ax, t: np.ndarray, trace: np.ndarray, baseline: float, heat: np.ndarray | None,
                  vmax: float) -> None:
    """One lead segment on its row baseline, with its anomaly heat band (if any) behind it."""
    if heat is not None and t.size > 1:
        # Opacity grows with the map value, so unremarkable stretches leave the paper untouched.
        level = np.clip(heat / vmax, 0.0, 1.0)
        rgba = colormaps[HEAT_CMAP](level)
        rgba[:, 3] = HEAT_MAX_ALPHA * level
        half = ROW_HEIGHT_MV / 2
        ax.imshow(rgba[None], extent=(t[0], t[-1], baseline - half, baseline + half), aspect="auto",
                  interpolation="nearest", zorder=1)
    ax.plot(t, trace + baseline, color=TRACE_COLOR, linewidth=0.6, zorder=3)


def plot_ecg(signal: np.ndarray, fs: float, anomaly_map: np.ndarray | None = None, title: str = "",
             out: str | Path | None = None, lead_names: tuple[str, ...] = LEADS,
             max_seconds: float | None = None) -> Figure:
    """Draw a 12-lead ECG (``(12, n)`` in mV at ``fs`` Hz, leads in ``lead_names`` order) in the clinical layout.

    ``anomaly_map``: ``(12, n)`` on the same time axis, drawn as a heat band; ``title``: put the score, label and
    threshold here (`verdict_title`), drawn literally (no math text). ``out``: write the figure there (atomically),
    PNG or SVG by its suffix. ``max_seconds``: draw only the first that many seconds (at least the 10 s print; the
    footer says what was cut), which bounds the figure's width. Returns the ``Figure``.
    """
    signal = np.asarray(signal, dtype=np.float32)
    if signal.ndim != 2 or signal.shape[0] != len(lead_names) or signal.shape[1] < 2:
        raise ValueError(f"signal must be (leads={len(lead_names)}, samples>=2), got {signal.shape}")
    missing = {name for row in LAYOUT for name in row} - set(lead_names)
    if missing:
        raise ValueError(f"the clinical layout needs leads {sorted(missing)}")
    if anomaly_map is not None:
        anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
        if anomaly_map.shape != signal.shape:
            raise ValueError(f"anomaly_map shape {anomaly_map.shape} != signal shape {signal.shape}")
    suffix = Path(out).suffix.lower() if out is not None else ""
    if out is not None and suffix not in (".png", ".svg"):
        raise ValueError(f"plot output must end in .png or .svg, got {out}")

    full_duration = signal.shape[1] / float(fs)
    if max_seconds is not None and full_duration > max(max_seconds, PRINT_SECONDS):
        keep = int(round(max(max_seconds, PRINT_SECONDS) * fs))
        signal = signal[:, :keep]
        anomaly_map = anomaly_map[:, :keep] if anomaly_map is not None else None
    n = signal.shape[1]
    duration = n / float(fs)
    print_s = min(PRINT_SECONDS, duration)
    # Each lead sits on its row baseline, centred on its median so baseline offsets do not push it off the row.
    centred = signal - np.median(signal, axis=1, keepdims=True)
    vmax = float(anomaly_map.max()) if anomaly_map is not None and anomaly_map.max() > 0 else 1.0
    t0, t1 = -CAL_SECONDS, duration
    y0, y1 = -(len(LAYOUT) + 1) * ROW_HEIGHT_MV, 0.0     # the print's rows and the rhythm strip

    # The axes box is sized so that one second is exactly 25 mm and one millivolt exactly 10 mm.
    paper_w = (t1 - t0) * PAPER_SPEED_MM_S / MM_PER_INCH
    paper_h = (y1 - y0) * GAIN_MM_MV / MM_PER_INCH
    fig_w, fig_h = paper_w + 2 * MARGIN_IN, paper_h + MARGIN_IN + TITLE_IN
    fig = Figure(figsize=(fig_w, fig_h))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((MARGIN_IN / fig_w, MARGIN_IN / fig_h, paper_w / fig_w, paper_h / fig_h))
    _draw_paper(ax, t0, t1, y0, y1)

    def lead_row(row: int, names: tuple[str, ...], seg_s: float) -> None:
        baseline = -(row + 0.5) * ROW_HEIGHT_MV
        cal_t = -CAL_SECONDS + np.array([0.08, 0.12, 0.12, 0.32, 0.32, CAL_SECONDS - 0.04])
        ax.plot(cal_t, baseline + np.array([0, 0, 1, 1, 0, 0]), color=TRACE_COLOR, linewidth=0.8, zorder=3)
        for col, name in enumerate(names):
            start, stop = int(round(col * seg_s * fs)), min(n, int(round((col + 1) * seg_s * fs)))
            lead = lead_names.index(name)
            heat = anomaly_map[lead, start:stop] if anomaly_map is not None else None
            _draw_segment(ax, np.arange(start, stop) / fs, centred[lead, start:stop], baseline, heat, vmax)
            ax.text(col * seg_s + 0.05, baseline + 0.9, name, fontsize=9, fontweight="bold", zorder=4,
                    parse_math=False)
            if col:
                ax.vlines(col * seg_s, baseline - 0.3, baseline + 0.3, colors=TRACE_COLOR, linewidths=1.0, zorder=3)

    for row, names in enumerate(LAYOUT):
        lead_row(row, names, print_s / len(names))
    lead_row(len(LAYOUT), (RHYTHM_LEAD,), duration)

    ax.set_xlim(t0, t1)
    ax.set_ylim(y0, y1)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10, loc="left", parse_math=False)
    cut = f"  (first {duration:g} s of {full_duration:g} s)" if duration < full_duration else ""
    ax.text(t1, y0 - 0.2, f"{PAPER_SPEED_MM_S:g} mm/s  {GAIN_MM_MV:g} mm/mV  {fs:g} Hz{cut}", fontsize=7,
            ha="right", va="top", parse_math=False)
    if out is not None:
        with atomic_file(out) as fh:
            fig.savefig(fh, format=suffix[1:], dpi=150)
    return fig
