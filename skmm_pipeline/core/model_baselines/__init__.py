"""Model-based selection baselines (the DeepCore set the SkMM paper compares with), on frozen features.

Interface
---------
Every method here takes ``X`` = the pool's frozen penultimate features (N x d, e.g. the standardised
output of :func:`skmm_pipeline.models.features.extract_features`) and **requires** ``labels`` (N,).
The classes are the distinct label values, mapped in sorted order to ``0..K-1``; at least two are
needed. Before scoring, a seeded *proxy* softmax linear head ``z = W x + b`` is trained on
``(X, labels)``: this is DeepCore's protocol of training the model on the full pool for a few epochs
before scoring, applied to the head on top of the pretrained, frozen body (DeepCore trains a randomly
initialised network from scratch; the research code's baselines did the same).

Proxy training (:func:`fit_proxy_head`): cross-entropy, minibatch SGD with Nesterov momentum 0.9,
weight decay on ``W`` and ``b``, a cosine-annealed step size over all steps (DeepCore's selection
optimiser), ``epochs`` passes over the pool in seeded random minibatches of ``batch_size``, weights
initialised like ``torch.nn.Linear`` from the seed. ``lr="auto"`` is ``1 / lambda_max(E[x~ x~^T])``
with ``x~ = [x, 1]``: a stable step on any feature scale (the cross-entropy Hessian is at most half
that second moment). Everything runs in float64 on the CPU and is a deterministic function of the
seed. Options shared by all methods (defaults): ``epochs=10`` (``forgetting``: 20), ``lr="auto"``,
``weight_decay=5e-4``, ``batch_size=128``, and ``balance``: with ``balance=True`` (the default of the
registered methods, as in DeepCore; the functions here default to ``False``) the budget is split over
the classes in proportion to their sizes (largest remainder, at least one per class) and each class
gets its own top scores / its own greedy run. Without it, the most uncertain / highest-scored samples
of a small budget often come from one or two confused classes, and a head trained on them is near
chance (digits benchmark: 15-25% at n = 10 against 67% for class-balanced uniform) (the
selection API's ``class_balanced=True`` cannot be used with these methods: it runs the method inside a
single class, where no classifier can be trained).

Modules: :mod:`.proxy` (the proxy head and its training), :mod:`.scores` (per-sample scores and
GLISTER's greedy), :mod:`.methods` (the ``select_*`` functions the selection API registers). Import
from the package.

Pool-wide passes go through chunks of rows; nothing of size N x N (or N x K x d) is ever formed.
Every method returns exactly ``n`` distinct indices in selection order; score ties are broken by a
seeded random order.

Methods
-------
* ``entropy`` / ``least-confidence`` / ``margin`` (uncertainty sampling, Settles 2009): the ``n`` most
  uncertain samples under the proxy's probabilities ``p``: largest entropy ``-sum_k p_k log p_k``,
  largest ``1 - max_k p_k``, smallest margin ``p_(1) - p_(2)`` (top two probabilities). *DeepCore
  differs*: it keeps the largest of the scores ``sum_k p_k log p_k`` (entropy) and ``p_(1) - p_(2)``
  (margin), i.e. the most *confident* samples, and its least confidence uses the largest *logit*
  instead of the largest probability.
* ``grand`` (GraNd, Paul, Ganguli & Dziugaite 2021): the expected norm of the per-sample loss gradient,
  averaged over ``repeats`` independently seeded proxy trainings; the largest are kept. For the linear
  softmax head the gradient of the cross-entropy w.r.t. ``(W, b)`` is ``(p - e_y) x~^T``, so the norm
  is ``||p - e_y||_2 sqrt(||x||^2 + 1)`` in closed form. The paper takes the gradient of all network
  parameters near initialisation; here the head is the only trainable part (use ``epochs=0`` for the
  at-initialisation score). DeepCore applies the cross-entropy to ``softmax(z)`` (a second softmax)
  and reseeds its repeats from the clock; neither is done here.
* ``el2n`` (EL2N, same paper): ``||p - e_y||_2`` averaged over ``repeats`` seeded trainings; largest kept.
* ``forgetting`` (Toneva et al. 2019): each sample's prediction is recorded every time it is presented
  in a minibatch (the forward pass of that training step, before the update); a forgetting event is a
  transition from correct to misclassified between consecutive presentations. Samples never
  classified correctly count as forgotten infinitely often (the paper's convention). The highest
  counts are kept, ties in seeded random order. DeepCore's counter never increments (it adds into a
  copy made by advanced indexing) and it does not single out never-learned samples.
* ``glister`` (GLISTER-ONLINE, Killamsetty et al. 2021): greedy maximisation of the validation
  log-likelihood with the first-order Taylor approximation. Starting from the proxy's parameters
  ``theta_0``, step ``t`` adds the unselected ``e`` maximising ``eta <grad L_T(e; theta_t),
  grad L_V(theta_t)>`` (the predicted increase of the validation log-likelihood after one SGD step on
  ``e``), then updates ``theta_{t+1} = theta_t - eta grad L_T(e; theta_t)``. The validation set is
  ``val_X``/``val_labels`` (features of the same body, labels among the pool's classes), by default the
  pool itself, as in DeepCore. ``eta="auto"`` is ``lr / n``, so the ``n`` incremental steps add up to
  one proxy-learning-rate step on the subset's mean loss (the scale of DeepCore's update, which moves by
  ``lr`` along the *mean* selected gradient). Gradients are those of the head, in closed form, and the
  pool and validation logits are kept current with rank-one updates; each pick costs
  ``O((N + N_val) K d)`` in row chunks. DeepCore keeps the training gradients at ``theta_0``, uses a
  second softmax in the loss, a lazy greedy (exact only for submodular gains, which these are not) and
  class balance by default; GLISTER's optional diversity regulariser is not used.
* ``deepfool`` (Ducoffe & Precioso 2018, DeepFool of Moosavi-Dezfooli et al. 2016): the samples closest
  to the decision boundary are kept. For the affine head DeepFool converges in one step to the exact
  minimal perturbation ``min_{k != pred} |z_pred - z_k| / ||w_pred - w_k||``, computed in closed form (in
  feature space: the body is frozen). DeepCore runs the iterative attack on the input pixels through
  the whole network and ranks by the squared perturbation norm (the same order).
* ``contextual-diversity`` (Agarwal, Arora, Anand & Arora 2020, CDAL-CS): k-center greedy (random
  seeded first center, then farthest-first) under the pairwise contextual-diversity distance
  ``d(i, j) = 1/2 KL(P_i || P_j) + 1/2 KL(P_j || P_i)``. In the paper ``P^c_I`` is the class-specific
  confusion of image ``I``: the entropy-weighted mean ``sum_r w_r P_r / sum_r w_r`` (``w_r`` = entropy
  of ``P_r``) of the softmax vectors of the regions predicted as ``c``, and ``d`` sums the symmetrised
  KL over classes. In classification a sample is a single region, so the weights cancel and ``P^c_I`` is
  the sample's own softmax vector ``P_i``, present only for its predicted class. Simplification (as in
  DeepCore): the confusion vectors are compared whatever the predicted classes; the paper's term for a
  class present in only one of the two samples is undefined, and the official code's choice (drop it)
  would give distance 0 between samples predicted differently, under which k-center never leaves the
  first center's class. ``covering_radius`` reports the largest distance to the nearest center.
"""

from skmm_pipeline.core.model_baselines.methods import (
    select_contextual_diversity,
    select_deepfool,
    select_forgetting,
    select_glister,
    select_gradient_norm,
    select_uncertainty,
)
from skmm_pipeline.core.model_baselines.proxy import (
    CHUNK_ROWS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_FORGETTING_EPOCHS,
    DEFAULT_LR,
    DEFAULT_REPEATS,
    DEFAULT_WEIGHT_DECAY,
    MOMENTUM,
    ProxyHead,
    TrainOptions,
    auto_lr,
    encode_labels,
    fit_proxy_head,
    repeat_seed,
)
from skmm_pipeline.core.model_baselines.scores import (
    UNCERTAINTY_KINDS,
    ForgettingTracker,
    contextual_diversity_kcenter,
    deepfool_distances,
    forgetting_counts,
    forgetting_scores,
    glister_greedy,
    gradient_norm_scores,
    symmetric_kl_to,
    uncertainty_scores,
)

__all__ = [
    "CHUNK_ROWS",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "DEFAULT_FORGETTING_EPOCHS",
    "DEFAULT_LR",
    "DEFAULT_REPEATS",
    "DEFAULT_WEIGHT_DECAY",
    "MOMENTUM",
    "UNCERTAINTY_KINDS",
    "ForgettingTracker",
    "ProxyHead",
    "TrainOptions",
    "auto_lr",
    "contextual_diversity_kcenter",
    "deepfool_distances",
    "encode_labels",
    "fit_proxy_head",
    "forgetting_counts",
    "forgetting_scores",
    "glister_greedy",
    "gradient_norm_scores",
    "repeat_seed",
    "select_contextual_diversity",
    "select_deepfool",
    "select_forgetting",
    "select_glister",
    "select_gradient_norm",
    "select_uncertainty",
    "symmetric_kl_to",
    "uncertainty_scores",
]
