"""The clinical 12-lead plot renders to PNG and SVG and is not blank."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from ecgad.plot import plot_ecg


def _ecg(seconds: float, fs: float = 500.0) -> np.ndarray:
    t = np.arange(int(seconds * fs)) / fs
    beat = np.exp(-((t % 0.8) - 0.3) ** 2 / 2e-4)             # a QRS-like spike every 0.8 s
    return np.stack([beat * (0.5 + 0.1 * lead) + 0.1 * np.sin(2 * np.pi * t) for lead in range(12)]
                    ).astype(np.float32)


def test_png_and_svg(tmp_path):
    signal = _ecg(10.0)
    heat = np.zeros_like(signal)
    heat[:, 2000:2500] = 1.0
    title = "rec1: score 0.0421 (anomalous, threshold 0.0312)"

    png = tmp_path / "ecg.png"
    fig = plot_ecg(signal, 500.0, anomaly_map=heat, title=title, out=png)
    assert fig.axes[0].get_title(loc="left") == title
    assert png.stat().st_size > 50_000
    pixels = imread(png)[..., :3]
    h, w, _ = pixels.shape
    assert w > 1200 and h > 600
    assert pixels.std() > 0.1                                   # not one flat colour
    dark = (pixels.max(axis=-1) < 0.3).mean()                   # the black traces
    assert 0.005 < dark < 0.5

    svg = tmp_path / "ecg.svg"
    plot_ecg(signal, 500.0, anomaly_map=heat, title=title, out=svg)
    text = svg.read_text()
    assert "<svg" in text and svg.stat().st_size > 50_000


def test_other_lengths_and_rates_without_output():
    assert plot_ecg(_ecg(6.0, fs=250.0), 250.0, title="short").axes
    long_fig = plot_ecg(_ecg(20.0), 500.0)
    short_fig = plot_ecg(_ecg(10.0), 500.0)
    # The rhythm strip keeps the paper speed, so a 20 s record makes a wider sheet.
    assert long_fig.get_figwidth() > 1.8 * short_fig.get_figwidth() - 1


def test_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="signal must be"):
        plot_ecg(np.zeros((3, 100)), 500.0)
    with pytest.raises(ValueError, match="anomaly_map shape"):
        plot_ecg(_ecg(10.0), 500.0, anomaly_map=np.zeros((12, 10)))
    with pytest.raises(ValueError, match=".png or .svg"):
        plot_ecg(_ecg(10.0), 500.0, out=tmp_path / "x.jpg")
