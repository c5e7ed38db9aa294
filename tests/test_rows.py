"""Prepared records survive the Arrow row codec bit-for-bit (scores after a Ray hop equal in-process scores)."""

import numpy as np
import pyarrow as pa
import pytest

from ecgad.rows import prepared_to_row, rejection_to_row, row_to_prepared
from ecgad.types import Prepared, Rejection, Window


def _prepared(rng: np.random.Generator) -> Prepared:
    windows = []
    for offset, n_beats in ((0, 3), (2500, 0), (5000, 2)):
        windows.append(Window(
            signal=rng.uniform(-1, 1, (12, 5000)).astype(np.float32),
            offset=offset,
            peaks=np.sort(rng.integers(0, 5000, n_beats + 2)),
            beat_peaks=np.sort(rng.integers(201, 4399, n_beats)),
            beats=rng.uniform(-1, 1, (n_beats, 12, 480)).astype(np.float32),
        ))
    return Prepared("rec-1", windows, n_samples_model=10000, source_fs=250.0, source_samples=5000,
                    metadata={"warnings": ["window 1 has no beat"], "ecg_id": 7})


def test_round_trip_through_arrow_is_exact():
    original = _prepared(np.random.default_rng(0))
    table = pa.Table.from_pylist([prepared_to_row(original), rejection_to_row("bad", Rejection("nan"))])
    rows = table.to_pylist()
    decoded = row_to_prepared(rows[0])
    assert decoded.record_id == "rec-1" and decoded.metadata == original.metadata
    assert (decoded.n_samples_model, decoded.source_fs, decoded.source_samples) == (10000, 250.0, 5000)
    for got, want in zip(decoded.windows, original.windows, strict=True):
        assert got.offset == want.offset
        np.testing.assert_array_equal(got.signal, want.signal)
        np.testing.assert_array_equal(got.beats, want.beats)
        np.testing.assert_array_equal(got.peaks, want.peaks)
        np.testing.assert_array_equal(got.beat_peaks, want.beat_peaks)
    assert rows[1]["status"] == "rejected" and rows[1]["reason"] == "nan"


def test_rejected_rows_do_not_decode():
    row = rejection_to_row("bad", Rejection("flat_lead", "V3"))
    assert row["reason"] == "flat_lead:V3"
    with pytest.raises(ValueError, match="rejected"):
        row_to_prepared(row)
