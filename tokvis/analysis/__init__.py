"""Analysis of reduction patterns: pure numpy / scipy / scikit-learn, torch is never imported.

Traces are accepted duck-typed (anything with ``labels()``, ``kept()``, ``depth()`` and ``meta``);
tensors are converted with ``.numpy()`` inside the functions.

* :mod:`~tokvis.analysis.patterns` -- per-image pattern similarity (IoU, IoA, V-measure, ARI, AMI, ...);
* :mod:`~tokvis.analysis.maps` -- global spatial maps and map metrics (KL, JS, PCC, SCC, EMD, SIM);
* :mod:`~tokvis.analysis.features` -- CLS-feature similarity (CKA, CCA, PWCCA, Procrustes);
* :mod:`~tokvis.analysis.importance` -- per-patch importance vs a reference, against a random method;
* :mod:`~tokvis.analysis.correlation` -- Spearman / Kendall / Pearson with bootstrap intervals;
* :mod:`~tokvis.analysis.compare` -- :func:`compare` traces by metadata into tidy tables.

Conventions: ``convention="standard"`` (default) gives tokvis's definitions; ``convention="study"``
(on :func:`compare`, :func:`compare_maps`, :func:`feature_scores` and the metric functions whose
values differ) reproduces the columns, names and units of the "Which Tokens to Use?" study's scripts.
Each module's ``Conventions`` section gives the formulas and their sources.
"""

from tokvis.analysis.compare import (
    BY,
    MAP_METRICS,
    MAPS,
    PRUNE_METRICS,
    STUDY_MAP_METRICS,
    STUDY_PATTERN_METRICS,
    compare,
    compare_maps,
    global_maps,
    pattern_family,
)
from tokvis.analysis.correlation import METHODS, correlate, correlation_table
from tokvis.analysis.features import (
    FEATURE_METRICS,
    STUDY_FEATURE_METRICS,
    cca_coefficients,
    feature_scores,
    linear_cka,
    mean_cca,
    mean_squared_cca,
    procrustes_distance,
    pwcca,
)
from tokvis.analysis.importance import importance_agreement, rank_correlation, top_k_mask
from tokvis.analysis.maps import (
    depth_map,
    emd,
    js_divergence,
    keep_frequency,
    kl_both,
    kl_divergence,
    merge_size_map,
    pcc,
    scc,
    sim,
)
from tokvis.analysis.patterns import (
    CONVENTIONS,
    MERGE_METRICS,
    Contingency,
    adjusted_mutual_info,
    adjusted_rand_index,
    completeness,
    contingency,
    homogeneity,
    ioa,
    iou,
    merge_scores,
    mutual_info,
    normalized_mutual_info,
    v_measure,
)

__all__ = [
    "BY",
    "CONVENTIONS",
    "FEATURE_METRICS",
    "MAPS",
    "MAP_METRICS",
    "MERGE_METRICS",
    "METHODS",
    "PRUNE_METRICS",
    "STUDY_FEATURE_METRICS",
    "STUDY_MAP_METRICS",
    "STUDY_PATTERN_METRICS",
    "Contingency",
    "adjusted_mutual_info",
    "adjusted_rand_index",
    "cca_coefficients",
    "compare",
    "compare_maps",
    "completeness",
    "contingency",
    "correlate",
    "correlation_table",
    "depth_map",
    "emd",
    "feature_scores",
    "global_maps",
    "homogeneity",
    "importance_agreement",
    "ioa",
    "iou",
    "js_divergence",
    "keep_frequency",
    "kl_both",
    "kl_divergence",
    "linear_cka",
    "mean_cca",
    "mean_squared_cca",
    "merge_scores",
    "merge_size_map",
    "mutual_info",
    "normalized_mutual_info",
    "pattern_family",
    "pcc",
    "procrustes_distance",
    "pwcca",
    "rank_correlation",
    "scc",
    "sim",
    "top_k_mask",
    "v_measure",
]
