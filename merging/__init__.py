"""Model merging: one module per method, each a pure function ``(base, models, **hparams) -> merged`` over pytrees,
registered by name in :mod:`merging.registry`. ``python -m merging CONFIG.yaml --out DIR`` runs mergekit-style configs.

Data-free merges (every registered method; the calling convention)
    ``method(base, models, *, **hparams) -> tree``: ``models`` is a list/tuple of pytrees with identical paths,
    shapes and dtypes; the result has the structure of ``base`` (or of ``models[0]`` without a base), every leaf
    in its own input dtype (computed in float32: a bf16-kernel + fp32-norm model comes back the same).
    ``base`` always means one thing: the pre-trained model θ_0 the ``models`` were fine-tuned from (mergekit's
    ``base_model``). Task-vector methods (task arithmetic, TIES, DARE, Breadcrumbs, DELLA, PCB, Model Stock,
    consensus/TALL) need it and merge ``τ_t = θ_t - θ_0``; interpolations (``slerp``, ``wise_ft``) need it as the
    t = 0 / α = 0 end with exactly one model in ``models``; ``nuslerp`` takes it optionally (given: interpolate
    task vectors and add them to θ_0; None: interpolate the two models); averages (``linear``, ``sparse_soup``)
    accept and ignore it, as mergekit does (put the base in ``models`` to average it). ``needs_base`` in the
    registry says which (True / "optional" / False).
    Hyper-parameters are keyword-only, one name each. Python and config (mergekit YAML) names are the same
    except two (:data:`merging.registry.PYTHON_NAMES`): mergekit's per-model ``weight`` is ``weights`` (one
    number per model, or one number for all; default 1 each) and ``lambda`` (the task-vector scaling λ
    everywhere) is ``lambda_``. ``density`` (and ``gamma``, ``epsilon``) keep mergekit's singular names and, like
    ``weights``, take one value per model or one for all. ``tall_lambda`` is the TALL-mask threshold (not a
    mergekit parameter). Stochastic methods take an explicit ``key``.
    Checks run before any work: compatible trees, floating leaves, valid hyper-parameters, and finite values: a
    NaN/Inf in ``base`` or any model raises ``ValueError`` naming the tree and the leaf path (``check_finite=False``
    opts out). Under ``jax.jit`` the inputs are tracers without values, so the finiteness check is skipped there
    (check concrete inputs before jitting); shape/dtype/hyper-parameter checks still run. Interpolation factors
    (``t``, ``alpha``) may be traced under ``jax.jit``; their range is checked when they are concrete.
    :func:`merging.wise_ft.layerwise_wise_ft` is WiSE-FT with one α per path-regex part (not registered: it takes
    ``alphas`` and ``groups``); :mod:`merging.bang` is BANG's fine-tuning objective (MixUp + label smoothing) whose
    result is then interpolated by ``wise_ft``. Not of this form: :mod:`merging.moe_expert_merge` merges the experts
    inside one model (``experts``, a tree of stacked ``[E, ...]`` leaves) and :func:`merging.tall_masks.tall_masks`
    returns masks, not a merged model.

Data-aware merges (the calling convention)
    ``method(base, models, <statistics or objective>, *, **hparams) -> MergeResult(params, info)``: the data-free
    shape plus what the method learns from: precomputed statistics (``fisher_merge(base, models, fishers)``,
    ``regmean(base, models, grams)``), a held-out score (``greedy_soup(base, models, eval_fn)``), or a model
    function and data (``regmean_from_data`` / ``regmean_plusplus(base, models, apply_fn, batches)``,
    ``adamerging`` / ``atlas(base, models, apply_fn, batches)``, ``twin_merging(base, models, apply_fn,
    router_batches)``, ``learn_layerwise_alphas(base, [ft], objective, groups=...)`` (Lin et al.'s AMA/HMA
    layer-wise ratios; ``info`` ``alphas`` / ``losses`` / ``objective``), ``pleas_mlp(base, [params_a, params_b],
    [x_a, x_b])``). ``base`` means the same as above:
    task-vector methods (AdaMerging, aTLAS) need θ_0; the others (Fisher, RegMean, RegMean++, greedy soup,
    Twin-Merging, PLeaS) accept and ignore it (pass None; put the base in ``models`` to make it an ingredient).
    Every one returns :class:`merging.result.MergeResult`: ``params`` is the merged tree (each leaf in its input
    dtype; Twin-Merging: the shared model θ_s; PLeaS: a wider MLP) and ``info`` a dict of the method's extras,
    listed in its docstring (``{}`` if none): RegMean ``ranks`` / ``rank_deficient``, greedy soup ``selected`` /
    ``individual_scores`` / ``score``, AdaMerging and aTLAS ``coefficients`` / ``losses``, Twin-Merging
    ``exclusive`` / ``router`` / ..., PLeaS ``widths`` / ``merged_pairs``. Hyper-parameter names follow the
    data-free ones (``weights``: one per model). Permutation alignment is trees first, then the spec:
    ``weight_matching(params_a, params_b, spec)``, ``activation_matching(params_a, params_b, apply_fn, batches,
    perm_layers)``, ``ste_permutation_search(params_a, params_b, spec, loss_fn, batches)`` (Re-Basin's
    straight-through estimator), ``apply_permutation(params, spec, perm)``; matching of N models is a merge,
    ``merge_many(base, models, spec) -> MergeResult`` (:mod:`merging.ste_permutation`), and
    :mod:`merging.alignment` measures how permutation aligns the layers' top singular vectors. Statistics helpers
    keep the model first:
    ``diagonal_fisher(apply_fn, params, batches)`` (batches ``(x, y)`` or ``(x, y, mask)`` for padded sequences)
    like :func:`jaxmodels.capture.collect_stats`. The uniform average everywhere is
    :func:`merging.linear.uniform_soup`.
"""

from jaxmodels import __version__  # the distribution's one version
from merging.registry import MergeMethod, available, get, register

# data-free methods (one module each)
from merging import (breadcrumbs, dare, della, linear, model_stock, nuslerp, pcb, slerp, tall_masks,
                     task_arithmetic, ties, wise_ft)
from merging import moe_expert_merge, robust_signatures, sparse_soup  # noqa: E402

# data-aware methods
from merging import (adamerging, atlas, fisher, greedy_soup, lmc, permutation, pleas, regmean,  # noqa: E402
                     twin_merging)
from merging import alignment, bang, ste_permutation  # noqa: E402
from merging.result import MergeResult  # noqa: E402
