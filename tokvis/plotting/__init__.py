"""Plotting (matplotlib, Axes-level: every function takes ``ax=None`` and returns the Axes).

* :mod:`tokvis.plotting.overlay` -- merge-region overlays and keep masks, with legends;
* :mod:`tokvis.plotting.maps` -- global maps, their method x method correlation, split-half reliability;
* :mod:`tokvis.plotting.stats` -- similarity matrices and correlation plots;
* :mod:`tokvis.plotting.figures` -- the study's figures on tidy tables (``tokvis figures`` composes them).
"""

from tokvis.plotting.figures import (
    cls_similarity,
    feature_source_view,
    fused_token_views,
    method_overlays,
    pair_performance,
    performance_correlation,
    similarity_vs_backbone,
    similarity_vs_keep_rate,
    source_weights,
    token_sources,
)
from tokvis.plotting.maps import (
    global_map,
    global_map_grid,
    map_correlation_matrix,
    map_correlations,
    split_half_reliability,
)
from tokvis.plotting.overlay import keep_mask, merge_overlay, overlay_legend, save_figure, trace_overlays
from tokvis.plotting.stats import correlation_plot, similarity_matrix

__all__ = [
    "cls_similarity",
    "correlation_plot",
    "feature_source_view",
    "fused_token_views",
    "global_map",
    "global_map_grid",
    "keep_mask",
    "map_correlation_matrix",
    "map_correlations",
    "merge_overlay",
    "method_overlays",
    "overlay_legend",
    "pair_performance",
    "performance_correlation",
    "save_figure",
    "similarity_matrix",
    "similarity_vs_backbone",
    "similarity_vs_keep_rate",
    "source_weights",
    "split_half_reliability",
    "token_sources",
    "trace_overlays",
]
