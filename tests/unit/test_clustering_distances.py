"""The Gram-form distances of K-Medoids and DPC-KNN (issue 21 §2) against the differences they replace.

``pairwise_distance`` computes ``||x_i - x_j||`` from one matrix product; these tests hold it to the
distances from the differences (``torch.cdist`` without the matrix product, and float64 loops), on
float32 tokens shaped like a ViT's (a large shared component) with exact duplicates, and the clusterings
built on it to the loop references of the test files.
"""

from __future__ import annotations

import torch

from tests.unit.test_methods_clustering import slow_dpc_knn
from tokvis.methods.dpcknn import dpc_centres, dpc_knn
from tokvis.methods.kmedoids import kmedoids, pairwise_distance


def vit_like_tokens(seed: int, B: int = 3, n: int = 40, C: int = 24) -> torch.Tensor:
    """float32 tokens with a shared offset ten times their spread; the last quarter are copies of the first."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, C, generator=g) + 10 * torch.randn(B, 1, C, generator=g)
    m = n // 4
    x[:, n - m :] = x[:, :m].clone()
    return x


def test_distances_equal_the_differences_and_keep_exact_zeros():
    x = vit_like_tokens(0, n=120, C=96)
    d = pairwise_distance(x, "euclidean")
    ref = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist")
    torch.testing.assert_close(d.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(d, d.transpose(1, 2))
    # exactly 0 exactly where the tokens are identical (the diagonal and the copies), as from the differences
    assert torch.equal(d == 0, ref == 0)
    assert int((ref == 0).sum()) == 3 * (120 + 2 * 30)
    # a copy's distances to every other token are its original's, so ties between copies stay ties
    others = torch.arange(30, 90)
    assert torch.equal(d[:, :30][:, :, others], d[:, 90:][:, :, others])


def test_kmedoids_study_rule_on_float32_duplicates_equals_the_differences():
    # against the distances from the differences (the former implementation, here in float64); not against the
    # study's loop (study_kmedoids), which puts a medoid with an identical twin into its twin's cluster
    x = vit_like_tokens(1)
    w = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(5))
    init = torch.sort(w, dim=1, descending=True, stable=True).indices[:, :8]
    medoids, cluster = kmedoids(pairwise_distance(x, "euclidean"), init, 3, w)
    ref = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist")
    ref_medoids, ref_cluster = kmedoids(ref, init, 3, w.double())
    assert torch.equal(medoids, ref_medoids)
    assert torch.equal(cluster, ref_cluster)
    assert not torch.equal(medoids, init), "the medoids must move from their start in this test"


def test_dpcknn_on_float32_duplicates_equals_loop_reference():
    x = vit_like_tokens(2)
    density, delta, dist = dpc_knn(x, 5)
    centres, cluster = dpc_centres(density * delta, dist, 10)
    for b in range(x.shape[0]):
        ref_density, ref_delta, ref_centres, ref_assign = slow_dpc_knn(x[b].double().numpy(), 5, 10)
        torch.testing.assert_close(density[b].double(), torch.from_numpy(ref_density), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(delta[b].double(), torch.from_numpy(ref_delta), rtol=1e-5, atol=1e-6)
        assert centres[b].tolist() == ref_centres
        assert centres[b][cluster[b]].tolist() == ref_assign
