"""Hash-code retrieval: bit packing, Hamming ranking and retrieval metrics.

See :mod:`service.retrieval.metrics` for the exact metric definitions and the
edge-case conventions (stable tie order, AP normalised by relevant items retrieved
in the top K, empty retrievals counting as precision 0).
"""

from service.retrieval.codes import (
    codes_to_hex,
    hex_to_codes,
    pack_bits,
    sign_codes,
    unpack_bits,
)
from service.retrieval.metrics import (
    average_precision_per_query,
    map_at_k,
    map_at_k_per_query,
    mean_average_precision,
    pr_curve_by_radius,
    precision_at_n_curve,
    precision_within_radius,
    relevance,
    targeted_map,
)
from service.retrieval.ranking import (
    hamming_distance,
    hamming_distance_pm1,
    rank,
    topk,
)

__all__ = [
    "average_precision_per_query",
    "codes_to_hex",
    "hamming_distance",
    "hamming_distance_pm1",
    "hex_to_codes",
    "map_at_k",
    "map_at_k_per_query",
    "mean_average_precision",
    "pack_bits",
    "pr_curve_by_radius",
    "precision_at_n_curve",
    "precision_within_radius",
    "rank",
    "relevance",
    "sign_codes",
    "targeted_map",
    "topk",
    "unpack_bits",
]
