"""The production `Scorer` against the published protocol (`oracle_score_window`), on real records.

A seeded random small model, its BatchNorm statistics randomized so that eval-mode BN (which the scorer folds into
its matrix products) does real work. Real records from the sample data, read and prepared by the shared chain.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgad.config import PrepConfig
from ecgad.io import read_record
from ecgad.maps import stitch_window_maps, to_source_axis
from ecgad.model import MCF, MCFConfig
from ecgad.oracle import oracle_score_window
from ecgad.preprocess import prepare
from ecgad.scoring import Scorer
from ecgad.types import Record, Rejection, Scores, Window

RTOL = 1e-5
RECORDS = ("ptbxl/records500/06000/06000_hr", "ptbxl/records500/06000/06004_hr",
           "ptbxl/records100/00000/00017_lr")   # two at 500 Hz; one at 100 Hz, abnormal (atrial flutter)
LONG_RECORD = "other_12lead/ptbdb/s0010_re"    # 38.4 s at 1000 Hz


def _random_model(config: MCFConfig, seed: int = 0) -> MCF:
    torch.manual_seed(seed)
    model = MCF(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> MCF:
    return _random_model(MCFConfig.small())


@pytest.fixture(scope="module")
def records(sample_data: Path) -> list[Record]:
    return [read_record(sample_data / name) for name in RECORDS]


@pytest.fixture(scope="module")
def windows(records) -> list[Window]:
    return [window for record in records for window in prepare(record).windows]


def _oracle(model: MCF, windows: list[Window]) -> tuple[np.ndarray, np.ndarray]:
    results = [oracle_score_window(model, w.signal, w.beat_peaks) for w in windows]
    return np.array([score for score, _ in results]), np.stack([m for _, m in results])


@pytest.mark.parametrize("trend_from_masked", [False, True])
def test_full_mode_reproduces_the_oracle_on_real_records(windows, trend_from_masked):
    model = _random_model(replace(MCFConfig.small(), trend_from_masked=trend_from_masked))
    expected_scores, expected_maps = _oracle(model, windows)
    scores, maps = Scorer(model, max_batch=16).score_windows(windows)  # several chunks and window groups
    np.testing.assert_allclose(scores, expected_scores, rtol=RTOL)
    np.testing.assert_allclose(maps, expected_maps, rtol=RTOL)
    assert maps.shape == (len(windows), 12, 4800) and maps.dtype == np.float32


def test_fast_mode_is_exact_for_one_beat_and_close_otherwise(model, windows):
    one_beat = [Window(w.signal, w.offset, w.peaks, w.beat_peaks[:1], w.beats[:1]) for w in windows]
    full_scores, full_maps = Scorer(model, mode="full").score_windows(one_beat)
    fast_scores, fast_maps = Scorer(model, mode="fast").score_windows(one_beat)
    np.testing.assert_allclose(fast_scores, full_scores, rtol=RTOL)
    np.testing.assert_allclose(fast_maps, full_maps, rtol=RTOL)

    fast_scores, fast_maps = Scorer(model, mode="fast").score_windows(windows)
    full_scores, _ = Scorer(model, mode="full").score_windows(windows)
    assert np.isfinite(fast_scores).all() and np.isfinite(fast_maps).all()
    np.testing.assert_allclose(fast_scores, full_scores, rtol=0.05)


def test_scorer_leaves_the_model_as_it_found_it(model, windows):
    model.train()
    try:
        scores, _ = Scorer(model).score_windows(windows[:1])
        assert model.training
    finally:
        model.eval()
    assert scores[0] == pytest.approx(oracle_score_window(model, windows[0].signal, windows[0].beat_peaks)[0],
                                      rel=RTOL)


def test_a_kept_scorer_follows_weight_changes_and_folds_only_then(windows):
    """The folded decoders are reused while the weights stay; an in-place update (an optimizer step, a load) or a
    BatchNorm statistic changed by a training pass is seen at the next call, as by a new scorer."""
    model = _random_model(MCFConfig.small())
    scorer = Scorer(model)
    before, _ = scorer.score_windows(windows[:1])
    folded = scorer._folded()
    scorer.score_windows(windows[:1])
    assert scorer._folded() is folded
    with torch.no_grad():
        model.global_decoder.main[-2].weight.add_(0.05)        # in place, as an optimizer step
    after, _ = scorer.score_windows(windows[:1])
    assert scorer._folded() is not folded and after[0] != pytest.approx(before[0], rel=1e-3)
    assert after[0] == pytest.approx(Scorer(model).score_windows(windows[:1])[0][0], rel=RTOL)
    model.load_state_dict(_random_model(MCFConfig.small(), seed=1).state_dict())   # copies into the same tensors
    assert scorer.score_windows(windows[:1])[0][0] == pytest.approx(
        oracle_score_window(model, windows[0].signal, windows[0].beat_peaks)[0], rel=RTOL)


def test_score_prepared_gives_record_scores_on_the_input_axis(model, records):
    prepared = [prepare(record) for record in records]
    results = Scorer(model, threshold=0.5).score_prepared(prepared)
    window_scores, _ = Scorer(model).score_windows([w for p in prepared for w in p.windows])
    assert [r.record_id for r in results] == [r.record_id for r in records]
    for record, result, window_score in zip(records, results, window_scores):
        assert isinstance(result, Scores)
        assert result.pred_score == pytest.approx(window_score, rel=1e-12)   # one window: its score
        assert result.pred_label == (result.pred_score > 0.5) and result.threshold == 0.5
        assert result.anomaly_map.shape == record.signal.shape and result.anomaly_map.dtype == np.float32
        assert np.all(result.anomaly_map >= 0)
        assert result.windows_scored == 1 and result.beats_used == len(result.r_peaks) > 0
        assert np.all((0 < result.r_peaks) & (result.r_peaks < record.n_samples))
    assert all(r.anomaly_map is None for r in Scorer(model).score_prepared(prepared, with_maps=False))
    assert not any(r.pred_label for r in Scorer(model).score_prepared(prepared, with_maps=False))  # NaN threshold


def test_a_long_record_is_scored_in_stitched_windows(model, sample_data: Path):
    record = read_record(sample_data / LONG_RECORD)
    prepared = prepare(record)
    assert len(prepared.windows) > 1
    scorer = Scorer(model, mode="fast")
    (result,) = scorer.score_prepared([prepared])
    assert result.anomaly_map.shape == record.signal.shape == (12, 38400)
    assert np.isfinite(result.anomaly_map).all()
    assert result.windows_scored == len(prepared.windows)
    window_scores, _ = scorer.score_windows(prepared.windows)
    n_beats = [w.n_beats for w in prepared.windows]
    assert result.pred_score == pytest.approx(np.average(window_scores, weights=n_beats), rel=1e-12)
    assert result.beats_used == sum(n_beats)


def test_stitching_averages_overlaps_and_holds_the_edges():
    cfg = PrepConfig()
    maps = [np.full((12, 4800), 1.0, np.float32), np.full((12, 4800), 3.0, np.float32)]
    stitched = stitch_window_maps(maps, [0, 2500], 7500, cfg)
    assert stitched.shape == (12, 7500)
    assert np.all(stitched[:, :2600] == 1) and np.all(stitched[:, 4900:] == 3)   # incl. the uncovered ends
    assert np.all(stitched[:, 2600:4900] == 2)                                   # the overlap
    ramp = np.tile(np.arange(4800, dtype=np.float32), (12, 1))
    single = stitch_window_maps([ramp], [0], 5000, cfg)
    assert np.all(single[:, :100] == 0) and np.all(single[:, 4900:] == 4799)
    np.testing.assert_array_equal(single[:, 100:4900], ramp)


def test_maps_go_back_to_the_source_rate():
    ramp = np.tile(np.arange(5000, dtype=np.float32), (12, 1))
    assert to_source_axis(ramp, 500, 500, 5000) is ramp
    down = to_source_axis(ramp, 500, 100, 1000)
    np.testing.assert_allclose(down[0], np.arange(1000) * 5.0)
    up = to_source_axis(ramp, 500, 1000, 10000)
    assert up.shape == (12, 10000) and up[0, 2] == 1.0 and up[0, -1] == 4999


def test_bad_records_come_back_as_rejections_in_place(model, records):
    flat = Record(records[0].signal.copy(), records[0].fs, records[0].lead_names, "flat")
    flat.signal[4] = 0.0
    short = Record(records[0].signal[:, :3000].copy(), records[0].fs, records[0].lead_names, "short")
    results = Scorer(model, mode="fast").score_records([flat, records[0], short], with_maps=False)
    assert isinstance(results[0], Rejection) and results[0].code == "flat_lead"
    assert isinstance(results[1], Scores) and results[1].record_id == records[0].record_id
    assert isinstance(results[2], Rejection) and results[2].code == "too_short"
    assert Scorer(model).score_records([]) == []
    with pytest.raises(Rejection, match="no_beats"):
        Scorer(model).score_windows([Window(np.zeros((12, 5000), np.float32), 0, np.zeros(0, np.int64),
                                            np.zeros(0, np.int64), np.zeros((0, 12, 480), np.float32))])


def test_model_version_and_checkpoint_loading(model, tmp_path: Path, windows):
    from ecgad.checkpoint import save_checkpoint

    scorer = Scorer(model)
    version = scorer.model_version
    assert len(version) == 12 and version == Scorer(model).model_version
    assert version != Scorer(_random_model(MCFConfig.small(), seed=1)).model_version
    save_checkpoint(tmp_path / "ckpt", model, model.config, PrepConfig(), threshold=0.25)
    loaded = Scorer.from_checkpoint(tmp_path / "ckpt", mode="fast")
    assert loaded.mode == "fast" and loaded.threshold == 0.25 and loaded.model_version.startswith(
        loaded.model_version[:12]) and loaded.model_version != version
    np.testing.assert_allclose(loaded.score_windows(windows[:1])[0], Scorer(model, mode="fast").score_windows(
        windows[:1])[0], rtol=RTOL)
    with pytest.raises(ValueError, match="mode"):
        Scorer(model, mode="turbo")
    assert math.isnan(Scorer(model).threshold)


# -- backends (ecgad.backends) ---------------------------------------------------------------------------------------

def test_an_unknown_backend_is_refused(model):
    with pytest.raises(ValueError, match="backend"):
        Scorer(model, backend="tvm")


@pytest.mark.slow
def test_the_compiled_backend_gives_the_eager_scores(windows):
    """torch.compile'd stages score as the eager reference (1e-4), over two calls (compiled once, reused), and
    follow weights that change between calls. Full mode only: fast mode runs the same stage functions, and the first
    compilation takes minutes on a small CPU machine."""
    model = _random_model(MCFConfig.small())
    eager = Scorer(model, max_batch=16)
    compiled = Scorer(model, max_batch=16, backend="compile")
    for _ in range(2):
        expected_scores, expected_maps = eager.score_windows(windows[:2])
        scores, maps = compiled.score_windows(windows[:2])
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-4)
        np.testing.assert_allclose(maps, expected_maps, rtol=1e-4, atol=1e-4 * float(expected_maps.max()))
        with torch.no_grad():
            model.local_decoder.main[0].weight.mul_(1.01)
