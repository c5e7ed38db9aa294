"""Diagnosis on top of the detector: SCP label levels, the network, its losses, thresholds, metrics and checkpoints,
and the long-tail synthetic data (fast: no Ray, small models)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ecgad.checkpoint import CheckpointError, load_checkpoint, publish_checkpoint, save_checkpoint
from ecgad.config import PrepConfig
from ecgad.diagnosis import (DiagnosisNet, HeadConfig, build_network, class_balanced_weights, diagnosis_metrics,
                             fit_thresholds, load_diagnosis, make_batch, make_loss, save_diagnosis_checkpoint)
from ecgad.labels import LEVELS, head_and_tail, level_classes, multi_hot, read_statements, vocabulary
from ecgad.model import MCF, MCFConfig
from ecgad.synth import generate_ecg
from ecgad.synth_dataset import LONG_TAIL_KINDS, long_tail_assignments, scp_codes

#: Strodthoff et al. (2020): classes per level on full PTB-XL, where every statement occurs.
BENCHMARK_CLASSES = {"all": 71, "diag": 44, "subdiag": 23, "superdiag": 5, "form": 19, "rhythm": 12}


@pytest.fixture(scope="module")
def statements(sample_data):
    return read_statements(sample_data / "ptbxl")


def test_levels_have_the_benchmark_class_counts(statements):
    every_statement = [{code: 0.0} for code in statements.index]
    assert {level: len(vocabulary(every_statement, statements, level)) for level in LEVELS} == BENCHMARK_CLASSES


def test_a_record_maps_to_its_classes_at_every_level(statements):
    codes = {"IMI": 15.0, "LVOLT": 0.0, "SR": 0.0}    # likelihood ignored, as the benchmark does
    assert level_classes(codes, statements, "all") == {"IMI", "LVOLT", "SR"}
    assert level_classes(codes, statements, "diag") == {"IMI"}
    assert level_classes(codes, statements, "subdiag") == {"IMI"}
    assert level_classes(codes, statements, "superdiag") == {"MI"}
    assert level_classes(codes, statements, "form") == {"LVOLT"}
    assert level_classes(codes, statements, "rhythm") == {"SR"}
    targets = multi_hot([codes, {"NORM": 100.0}], statements, "superdiag", ["MI", "NORM", "STTC"])
    np.testing.assert_array_equal(targets, [[1, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match="unknown label level"):
        level_classes(codes, statements, "subclass")


def test_tail_classes_are_those_under_one_percent_of_training_records():
    targets = np.zeros((200, 3), np.float32)
    targets[:150, 0] = 1      # 75 %
    targets[:2, 1] = 1        # 1 %: head (not fewer than 1 %)
    targets[:1, 2] = 1        # 0.5 %: tail
    split = head_and_tail(targets, ["A", "B", "C"])
    assert split["head"] == ["A", "B"] and split["tail"] == ["C"] and "1%" in split["rule"]


def test_losses():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bce = make_loss("bce", [10, 10])(logits, targets)
    assert torch.isclose(make_loss("balanced", [10, 10])(logits, targets), bce)   # equal counts: plain BCE
    assert make_loss("focal", [10, 10])(logits, targets) < bce                   # down-weights easy entries
    weights = class_balanced_weights([1000, 10, 1])
    assert weights[0] < weights[1] < weights[2] and math.isclose(weights.mean(), 1.0, rel_tol=1e-6)
    with pytest.raises(ValueError):
        make_loss("hinge", [1])


def test_thresholds_maximize_youden_j_on_the_selection_fold():
    targets = np.array([[0, 1], [0, 1], [1, 1], [1, 1]], np.float32)
    probs = np.array([[0.1, 0.2], [0.3, 0.4], [0.6, 0.5], [0.8, 0.9]])
    thresholds = fit_thresholds(targets, probs)
    assert 0.3 <= thresholds[0] < 0.6           # separates the classes: sensitivity = specificity = 1
    assert thresholds[1] == 0.5                 # no negative to calibrate on: the default
    split = {"rule": "r", "head": ["A"], "tail": ["B"]}
    metrics = diagnosis_metrics(targets, probs, thresholds, ["A", "B"], split, n_boot=20)
    assert metrics["per_class"]["A"] == {"positives": 2, "threshold": thresholds[0], "auroc": 1.0, "auprc": 1.0,
                                         "sensitivity": 1.0, "specificity": 1.0}
    assert metrics["per_class"]["B"]["auroc"] is None
    assert metrics["macro_auroc"]["all"]["auroc"] == 1.0 and metrics["macro_auroc"]["tail"]["auroc"] is None


def _batch(n_windows: int = 3, n_classes: int = 4) -> tuple:
    rng = np.random.default_rng(0)
    cfg = PrepConfig()
    globals_ = rng.uniform(-1, 1, (n_windows, 12, cfg.global_len)).astype(np.float32)
    beats = [rng.uniform(-1, 1, (k, 12, cfg.beat_len)).astype(np.float32) for k in (1, 7, 3)[:n_windows]]
    return make_batch(globals_, beats, rng.integers(0, 2, (n_windows, n_classes)).astype(np.float32))


def test_network_starting_points_and_frozen_encoders():
    torch.manual_seed(0)
    detector = MCF(MCFConfig.small()).eval()
    head_config = HeadConfig(n_classes=4, hidden=detector.config.hidden)
    batch = _batch()
    assert batch.beats.shape[0] == 1 + 4 + 3                  # at most 4 beats a window, spread over it
    pretrained = build_network(head_config, detector, "pretrained", freeze_encoders=False)
    assert torch.equal(pretrained.mcf.global_encoder.main[0].weight, detector.global_encoder.main[0].weight)
    assert pretrained(batch).shape == (3, 4)
    trainable = {n for n, p in pretrained.named_parameters() if p.requires_grad}
    assert "mcf.global_encoder.main.0.weight" in trainable and not any("decoder" in n for n in trainable)
    probe = build_network(head_config, detector, "pretrained", freeze_encoders=True)
    assert {n.split(".")[0] for n, p in probe.named_parameters() if p.requires_grad} == {"head"}
    probe.train()
    assert not probe.mcf.training and probe.head.training     # frozen batch-norm statistics stay the detector's
    scratch = build_network(head_config, detector, "random", freeze_encoders=False)
    assert not torch.equal(scratch.mcf.global_encoder.main[0].weight, detector.global_encoder.main[0].weight)
    with pytest.raises(ValueError):
        DiagnosisNet(MCF(MCFConfig.small()), HeadConfig(n_classes=2, hidden=50))


def test_diagnosis_checkpoint_keeps_the_detector_and_versions_the_head(tmp_path):
    torch.manual_seed(0)
    detector = load_checkpoint(save_checkpoint(tmp_path / "detector", MCF(MCFConfig.small()), MCFConfig.small(),
                                               PrepConfig(), threshold=1.0))
    torch.manual_seed(1)
    net = build_network(HeadConfig(n_classes=4, hidden=detector.model_config.hidden), detector.model, "pretrained",
                        freeze_encoders=False).eval()
    entry = {"level": "superdiag", "classes": list("ABCD"), "thresholds": [0.5] * 4}
    saved = save_diagnosis_checkpoint(tmp_path / "staged", detector, net, entry)
    published = publish_checkpoint(saved, tmp_path / "run")
    assert published.model_version != detector.model_version                    # the head is part of the version
    assert published.model_version.split("-")[0] == detector.model_version.split("-")[0]   # same detector weights
    checkpoint, loaded = load_diagnosis(tmp_path / "run" / "best")
    batch = _batch()
    torch.testing.assert_close(loaded(batch), net(batch))
    assert checkpoint.diagnosis["classes"] == list("ABCD") and checkpoint.threshold == detector.threshold
    with pytest.raises(CheckpointError, match="without a diagnosis head"):
        load_diagnosis(detector.path)
    (published.path / "diagnosis.pt").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(published.path)


def test_combined_anomalies_and_long_tail_prevalence():
    ecg = generate_ecg(3, "st_elevation+pvc")
    codes = scp_codes(ecg)
    assert {"STE_", "PVC", "SR"} <= set(codes) and ({"IMI", "AMI", "LMI"} & set(codes))
    assert ecg.beat_types.count("V") == 1 and ecg.mask.any()
    single = generate_ecg(3, "st_elevation")
    np.testing.assert_array_equal(single.signal, generate_ecg(3, "st_elevation").signal)
    with pytest.raises(ValueError, match="unknown anomaly"):
        generate_ecg(3, "pvc+hiccup")
    anomalies, folds = long_tail_assignments(1000, 0.5, np.random.default_rng(0))
    counts = [anomalies.count(kind) for kind in LONG_TAIL_KINDS]
    assert counts == sorted(counts, reverse=True) and counts[0] > 10 * counts[-1]   # a power law
    assert min(counts) / len(anomalies) < 0.01 and min(counts) >= 1
    rarest = [f for a, f in zip(anomalies, folds) if a == LONG_TAIL_KINDS[-1]]
    assert rarest[:2] == [10, 9]     # the rarest kind reaches the test and selection folds first
