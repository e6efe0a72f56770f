"""Per-sample gradients of the finetuned parameters, in factored form.

For a Linear or Conv2d layer the per-sample gradient of its weight and bias is a sum of outer products,

    g_i = sum_p  delta_{i,p} (x) a_{i,p}        (row-major: index = o * (d_in + 1) + j)

with ``a_{i,p} = [activation patch, 1]`` the layer input at position ``p`` (one position for a plain
Linear layer, the unfolded patches of a convolution, the tokens of a sequence) and ``delta_{i,p}`` the
gradient of the loss with respect to the layer output at that position. :class:`GradientFactorizer`
captures both factors with forward hooks and one backward pass per batch, so ``g_i`` (K * d values for
a head, millions for a conv layer) is never formed; sketches are taken of the factors
(``core.sketch.TensorSketch``). For the layer that produces the logits of a softmax-cross-entropy
model, ``delta`` is closed form (``softmax(z) - onehot(y)``) and no backward pass is needed.

The layout of a layer's gradient is that of ``[W.reshape(d_out, -1) | b]`` flattened row-major, with the
bias last in every row; a parameter set's gradient is its layers' gradients concatenated in the
order the layers are given. :func:`vmap_layer_gradients` builds the same layout with
``torch.func.vmap`` and is the slow, generic oracle the factored path is tested against.

Label modes (the loss whose gradient is taken; ``logits = z``, ``p = softmax(z)``, ``K`` classes):

``expected`` (default: label-free, noise-free)
    The expected second moment of the cross-entropy gradient under a uniformly random label. At a
    near-uniform softmax it is ``J_i^T C J_i`` with ``C = I/K - 11^T/K^2`` and ``J_i`` the Jacobian of
    the logits with respect to the parameters. One row per sample represents it as
    ``vec(P J_i)`` with ``P`` a fixed ``(K-1) x K`` basis of the centred class space scaled so that
    ``P^T P = C * K/(K-1)``: the rows' inner products are ``K/(K-1) tr(J_i^T C J_j)`` and the partial
    trace over classes of their second moment is ``K/(K-1)`` times the expected moment. For the
    logits layer itself ``P J_i = P (x) x~_i`` has a sample-independent class factor of unit norm,
    so its block is represented exactly by the Jacobian row ``x~_i = [h_i, 1]``; a linear head
    (FT-1) therefore sketches ``x~_i`` alone, and then every moment criterion over subsets is exact
    (the moment is ``C (x) sum_i x~_i x~_i^T``). Dropped: the per-sample rank-one term
    ``(p_i - u)(p_i - u)^T`` of a non-uniform softmax (``random`` keeps it).
    A deep block needs one output gradient per row of ``P`` (K - 1 backward probes). With
    ``class_probes = r < K - 1`` the class space is sketched instead: ``P`` becomes ``S P / sqrt(r)``
    for a seeded r x (K - 1) Rademacher ``S`` (:func:`.labels.class_probes`), the same for every
    sample, so the rows are a fixed linear map of the exact ones with unbiased inner products, at r
    probes. The logits layer's block stays exact.
``random``
    Uniformly random labels, ``draws`` of them per sample, drawn from ``(seed, sample id, draw)``
    alone so that every split of the data into batches or shards draws the same labels. The draws are
    combined into one row per sample with seeded signs: ``g_i = J_i^T sum_k eps_ik (p_i - e_{y_ik}) /
    sqrt(draws)`` (``eps_i0 = +1``, the others Rademacher). Its second moment is unbiased both for the
    average of the ``draws`` per-draw moments (over the signs) and for the exact expected moment
    (over labels and signs), including the ``(p - u)`` term. With one draw it is the classic single
    random-label gradient (noisy: it puts each sample in one class block).
``true``
    The gradient of cross-entropy with the given labels, ``J_i^T (p_i - e_{y_i})``.
``jacobian``
    Regression / linear probing with a squared loss at ``theta = 0``: the Jacobian rows
    ``vec(J_i) / sqrt(K)``; for a linear head these are the features ``x~_i = [h_i, 1]``.

Modules: :mod:`.labels` (label modes, the loss gradient at the logits, the linear head's rows, seeded
random labels, class probes), :mod:`.layers` (the finetuned parameter set and how its layers are
read), :mod:`.factorizer` (:class:`GradientFactorizer` and :class:`FactorBlock`), :mod:`.oracle` (the
``torch.func`` oracle). Import from the package.
"""

from skmm_pipeline.core.gradients.factorizer import (
    FactorBlock,
    GradientFactorizer,
    explain_non_finite,
)
from skmm_pipeline.core.gradients.labels import (
    LABEL_MODES,
    check_label_mode,
    class_probes,
    draw_random_labels,
    gradient_dim,
    head_gradient_rows,
    label_weighted_delta,
    probe_count,
    sample_keys,
    softmax_ce_delta,
)
from skmm_pipeline.core.gradients.layers import (
    PRESETS,
    SUPPORTED_LAYERS,
    layer_dims,
    resolve_layers,
)
from skmm_pipeline.core.gradients.oracle import (
    layer_param_names,
    to_layer_layout,
    vmap_gradients,
    vmap_layer_gradients,
    vmap_layer_jacobians,
)

__all__ = [
    "LABEL_MODES",
    "PRESETS",
    "SUPPORTED_LAYERS",
    "FactorBlock",
    "GradientFactorizer",
    "check_label_mode",
    "class_probes",
    "draw_random_labels",
    "explain_non_finite",
    "gradient_dim",
    "head_gradient_rows",
    "label_weighted_delta",
    "layer_dims",
    "layer_param_names",
    "probe_count",
    "resolve_layers",
    "sample_keys",
    "softmax_ce_delta",
    "to_layer_layout",
    "vmap_gradients",
    "vmap_layer_gradients",
    "vmap_layer_jacobians",
]
