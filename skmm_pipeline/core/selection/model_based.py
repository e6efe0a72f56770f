"""The model-based baselines (:mod:`skmm_pipeline.core.model_baselines`) as selectors."""

from __future__ import annotations

from skmm_pipeline.core import model_baselines
from skmm_pipeline.core.selection.registry import Family, SelectorResult

MODEL_BASED = Family("model-based")

# Model-based baselines (see :mod:`skmm_pipeline.core.model_baselines`): X = frozen penultimate features,
# labels required; a seeded proxy softmax head is trained on (X, labels) before scoring.
_MB = model_baselines
_EP, _LR, _WD, _BS, _REP = _MB.DEFAULT_EPOCHS, _MB.DEFAULT_LR, _MB.DEFAULT_WEIGHT_DECAY, _MB.DEFAULT_BATCH_SIZE, _MB.DEFAULT_REPEATS


def _training(epochs, lr, weight_decay, batch_size) -> dict:
    return dict(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size)


@MODEL_BASED.method("entropy", "uncertainty: largest predictive entropy of a proxy head", group="label-using", input="features")
def _entropy(X, n, *, seed, labels=None, stats=None, epochs=_EP, lr=_LR, weight_decay=_WD, batch_size=_BS, balance=True):
    return SelectorResult(*_MB.select_uncertainty(X, n, labels, kind="entropy", seed=seed, balance=balance,
                                                  **_training(epochs, lr, weight_decay, batch_size)))


@MODEL_BASED.method("margin", "uncertainty: smallest top-two probability margin of a proxy head", group="label-using", input="features")
def _margin(X, n, *, seed, labels=None, stats=None, epochs=_EP, lr=_LR, weight_decay=_WD, batch_size=_BS, balance=True):
    return SelectorResult(*_MB.select_uncertainty(X, n, labels, kind="margin", seed=seed, balance=balance,
                                                  **_training(epochs, lr, weight_decay, batch_size)))


@MODEL_BASED.method("least-confidence", "uncertainty: smallest top probability of a proxy head", group="label-using", input="features")
def _least_confidence(X, n, *, seed, labels=None, stats=None, epochs=_EP, lr=_LR, weight_decay=_WD, batch_size=_BS,
                      balance=True):
    return SelectorResult(*_MB.select_uncertainty(X, n, labels, kind="least-confidence", seed=seed, balance=balance,
                                                  **_training(epochs, lr, weight_decay, batch_size)))


@MODEL_BASED.method("grand", "GraNd: largest expected head-gradient norm over seeded proxy trainings", group="label-using", input="features")
def _grand(X, n, *, seed, labels=None, stats=None, repeats=_REP, epochs=_EP, lr=_LR, weight_decay=_WD, batch_size=_BS,
           balance=True):
    return SelectorResult(*_MB.select_gradient_norm(X, n, labels, score="grand", seed=seed, repeats=repeats, balance=balance,
                                                    **_training(epochs, lr, weight_decay, batch_size)))


@MODEL_BASED.method("el2n", "EL2N: largest expected L2 error of the proxy's probabilities", group="label-using", input="features")
def _el2n(X, n, *, seed, labels=None, stats=None, repeats=_REP, epochs=_EP, lr=_LR, weight_decay=_WD, batch_size=_BS,
          balance=True):
    return SelectorResult(*_MB.select_gradient_norm(X, n, labels, score="el2n", seed=seed, repeats=repeats, balance=balance,
                                                    **_training(epochs, lr, weight_decay, batch_size)))


@MODEL_BASED.method("forgetting", "forgetting events while training the proxy (never learned first)", group="label-using", input="features")
def _forgetting(X, n, *, seed, labels=None, stats=None, epochs=_MB.DEFAULT_FORGETTING_EPOCHS, lr=_LR, weight_decay=_WD,
                batch_size=_BS, balance=True):
    return SelectorResult(*_MB.select_forgetting(X, n, labels, seed=seed, balance=balance,
                                                 **_training(epochs, lr, weight_decay, batch_size)))


@MODEL_BASED.method("glister", "GLISTER-ONLINE: greedy validation log-likelihood (Taylor) with head updates", group="label-using",
                    input="features")
def _glister(X, n, *, seed, labels=None, stats=None, val_X=None, val_labels=None, eta="auto", epochs=_EP, lr=_LR,
             weight_decay=_WD, batch_size=_BS, balance=True):
    return SelectorResult(*_MB.select_glister(X, n, labels, seed=seed, val_X=val_X, val_labels=val_labels, eta=eta,
                                              balance=balance,
                                              **_training(epochs, lr, weight_decay, batch_size)))


@MODEL_BASED.method("deepfool", "DeepFool: smallest exact distance to the proxy head's decision boundary", group="label-using",
                    input="features")
def _deepfool(X, n, *, seed, labels=None, stats=None, epochs=_EP, lr=_LR, weight_decay=_WD, batch_size=_BS, balance=True):
    return SelectorResult(*_MB.select_deepfool(X, n, labels, seed=seed, balance=balance,
                                               **_training(epochs, lr, weight_decay, batch_size)))


@MODEL_BASED.method("contextual-diversity", "k-center greedy under the symmetric-KL contextual-diversity distance",
                    group="label-using", input="features")
def _contextual_diversity(X, n, *, seed, labels=None, stats=None, epochs=_EP, lr=_LR, weight_decay=_WD, batch_size=_BS,
                          balance=True):
    return SelectorResult(*_MB.select_contextual_diversity(X, n, labels, seed=seed, balance=balance,
                                                           **_training(epochs, lr, weight_decay, batch_size)))
