"""FT-1 / FT-2 evaluation: validation-only model selection, metrics, determinism, the digits task."""

import numpy as np
import pytest
import torch
from torch import nn

from skmm_pipeline.core.validation import InputError
from skmm_pipeline.evaluation import EvalSplit, FinetuneGrid, finetune_tail, linear_probe, macro_f1
from skmm_pipeline.models.backbones import build_backbone, finetune_split, parameter_set
from skmm_pipeline.models.features import Standardizer

SMALL_GRID = FinetuneGrid(lrs=(1e-3, 1e-2), weight_decays=(0.0, 0.1), epochs=(2, 6), batch_size=16)


def blobs(n, seed, name, d=6, k=3, noise=1.0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 2.0, size=(k, d))
    y = rng.integers(0, k, size=n)
    X = (centres[y] + rng.normal(0, noise, size=(n, d))).astype(np.float32)
    return EvalSplit(X, y.astype(np.int64), [f"{name}/{i}" for i in range(n)])


def mlp_tail(d=6, k=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, k))


def test_model_selection_never_touches_test_ids():
    train, val, test = blobs(60, 1, "train"), blobs(40, 2, "val"), blobs(50, 3, "test")
    tail = mlp_tail()
    result = finetune_tail(None, tail, train, val, test, grid=SMALL_GRID, seed=0)
    assert result.split_ids["fit"] == train.ids
    assert result.split_ids["select"] == val.ids
    assert result.split_ids["test"] == test.ids
    assert not set(result.split_ids["select"]) & set(test.ids)
    assert not set(result.split_ids["fit"]) & set(test.ids)
    assert len(result.trials) == 2 * 2 * 2
    assert result.hyperparameters in [{k: t[k] for k in ("lr", "weight_decay", "epochs")} for t in result.trials]
    assert 0.0 <= result.test_macro_f1 <= 1.0 and result.test_accuracy > 0.6

    # The chosen configuration cannot depend on the test split: scramble its labels, same choice.
    scrambled = EvalSplit(test.inputs, (test.targets + 1) % 3, test.ids)
    other = finetune_tail(None, tail, train, val, scrambled, grid=SMALL_GRID, seed=0)
    assert other.hyperparameters == result.hyperparameters and other.trials == result.trials
    assert other.test_accuracy != result.test_accuracy


def test_overlapping_splits_are_refused():
    train, val = blobs(20, 1, "a"), blobs(20, 2, "b")
    leaky = EvalSplit(val.inputs[:5], val.targets[:5], val.ids[:5])
    with pytest.raises(InputError, match="validation and test splits share 5 sample id"):
        finetune_tail(None, mlp_tail(), train, val, leaky, grid=SMALL_GRID)
    with pytest.raises(InputError, match="labels \\[3\\] are outside the tail's 3 outputs"):
        bad = EvalSplit(train.inputs, np.full(20, 3), train.ids)
        finetune_tail(None, mlp_tail(), bad, val, blobs(5, 3, "c"), grid=SMALL_GRID)


def test_deterministic_for_a_seed_and_the_model_is_untouched():
    train, val, test = blobs(40, 4, "train"), blobs(30, 5, "val"), blobs(30, 6, "test")
    tail = mlp_tail()
    before = {k: v.clone() for k, v in tail.state_dict().items()}
    a = finetune_tail(None, tail, train, val, test, grid=SMALL_GRID, seed=3)
    b = finetune_tail(None, tail, train, val, test, grid=SMALL_GRID, seed=3)
    assert a.trials == b.trials and a.test_metrics == b.test_metrics
    assert all(torch.equal(before[k], v) for k, v in tail.state_dict().items())
    # Without the activation cache (prefix recomputed per batch) the numbers are the same.
    prefix = nn.Identity()
    c = finetune_tail(prefix, tail, train, val, test, grid=SMALL_GRID, seed=3, cache_bytes=0)
    assert c.extra["train_activations_cached"] is False
    assert c.trials == a.trials and c.test_metrics == a.test_metrics


def test_regression_reports_mae():
    rng = np.random.default_rng(0)
    w = rng.normal(size=5)

    def split(n, name, seed):
        X = np.random.default_rng(seed).normal(size=(n, 5)).astype(np.float32)
        return EvalSplit(X, (100 + 10 * X @ w).astype(np.float32), [f"{name}/{i}" for i in range(n)])

    train, val, test = split(80, "train", 1), split(40, "val", 2), split(40, "test", 3)
    torch.manual_seed(0)
    grid = FinetuneGrid(lrs=(1e-2, 1e-1), weight_decays=(0.0,), epochs=(20, 60), batch_size=16)
    result = finetune_tail(None, nn.Linear(5, 1), train, val, test, task="regression", grid=grid, seed=0)
    baseline = float(np.mean(np.abs(test.targets - train.targets.mean())))
    assert set(result.test_metrics) == {"mae"} and result.test_mae < 0.1 * baseline
    assert result.n_classes_seen is None
    with pytest.raises(InputError, match="one output"):
        finetune_tail(None, nn.Linear(5, 2), train, val, test, task="regression", grid=grid)


def test_macro_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for _ in range(5):
        y, p = rng.integers(0, 4, 30), rng.integers(0, 5, 30)
        assert macro_f1(y, p) == pytest.approx(f1_score(y, p, average="macro", zero_division=0))


def test_ft1_probe_reports_macro_f1():
    train, val, test = blobs(60, 1, "train"), blobs(40, 2, "val"), blobs(50, 3, "test")
    std = Standardizer(train.inputs)
    res = linear_probe(std(train.inputs), train.targets, std(val.inputs), val.targets, std(test.inputs), test.targets)
    assert 0.5 < res.test_macro_f1 <= 1.0 and res.test_accuracy > 0.6
    one = linear_probe(train.inputs[:3], np.zeros(3, dtype=int), val.inputs, val.targets, test.inputs, test.targets)
    assert one.n_classes_seen == 1 and one.test_macro_f1 == pytest.approx(macro_f1(test.targets, np.zeros(50, dtype=int)))


def test_ft2_on_a_resnet_keeps_batchnorm_statistics():
    model = build_backbone("resnet18", 2, weights=None, seed=0)
    running = model.body.layer4[1].bn2.running_mean.clone()
    prefix, tail = finetune_split(model, "ft2")
    g = torch.Generator().manual_seed(0)

    def split(n, name):
        y = torch.arange(n) % 2
        x = torch.randn(n, 3, 32, 32, generator=g) + y[:, None, None, None].float()
        return EvalSplit(x.numpy(), y.numpy(), [f"{name}/{i}" for i in range(n)])

    grid = FinetuneGrid(lrs=(1e-3,), weight_decays=(0.0,), epochs=(1,), batch_size=4)
    result = finetune_tail(prefix, tail, split(8, "train"), split(4, "val"), split(4, "test"), grid=grid, seed=0)
    assert result.n_train == 8 and set(result.test_metrics) == {"accuracy", "macro_f1"}
    assert torch.equal(model.body.layer4[1].bn2.running_mean, running)
    assert len(parameter_set(model, "ft2")) == len(list(tail.parameters()))


@pytest.fixture(scope="module")
def digits():
    from skmm_pipeline.data.digits import load_digits_transfer
    from skmm_pipeline.models.small_cnn import pretrain

    data = load_digits_transfer()
    model = pretrain(data.source_train.images, data.source_train.labels, data.num_classes, epochs=3, seed=0)
    return data, model


def digits_split(split, name, idx=None):
    idx = np.arange(len(split.labels)) if idx is None else idx
    return EvalSplit(split.images[idx], split.labels[idx], [f"{name}/{i}" for i in idx])


def test_ft2_on_the_digits_task(digits):
    data, model = digits
    prefix, tail = finetune_split(model, "ft2")  # body[-2] (fc 1024->128) + ReLU + head
    assert [n for n, _ in parameter_set(model, "ft2")] == ["body.6.weight", "body.6.bias", "head.weight", "head.bias"]
    grid = FinetuneGrid(lrs=(3e-3,), weight_decays=(0.0, 0.1), epochs=(4, 8), batch_size=64)
    pool, val, test = digits_split(data.pool, "pool"), digits_split(data.val, "val"), digits_split(data.test, "test")
    full = finetune_tail(prefix, tail, pool, val, test, grid=grid, seed=0)
    assert full.test_accuracy >= 0.93 and full.test_macro_f1 >= 0.93, full.test_metrics
    assert full.split_ids["select"] == val.ids and not set(full.split_ids["select"]) & set(test.ids)
    few = finetune_tail(prefix, tail, digits_split(data.pool, "pool", np.arange(0, 537, 27)), val, test, grid=grid, seed=0)
    assert few.n_train == 20 and few.test_accuracy < full.test_accuracy
