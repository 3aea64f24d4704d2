import pytest
import torch

from ditprune import granularity as G

S = torch.tensor([[1.0, 4.0, 2.0, 3.0], [8.0, 5.0, 7.0, 6.0]])


def test_row_mask_hand_computed():
    assert G.row_mask(S, 0.5).tolist() == [[False, True, False, True], [True, False, True, False]]


def test_layer_mask_hand_computed():
    assert G.layer_mask(S, 0.5).tolist() == [[False] * 4, [True] * 4]
    assert G.layer_mask(S, 0.25).tolist() == [[False, True, False, True], [True] * 4]


def test_nm_mask_hand_computed():
    s = torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0, 5.0, 7.0, 6.0]])
    assert G.nm_mask(s, 2, 4).tolist() == [[False, True, False, True, True, False, True, False]]
    assert G.nm_mask(s, 1, 4).tolist() == [[False, True, False, False, True, False, False, False]]
    assert G.nm_mask(s, 4, 8).tolist() == [[False, False, False, False, True, True, True, True]]


def test_nm_mask_rejects_pattern_that_does_not_divide():
    with pytest.raises(ValueError, match="does not divide"):
        G.nm_mask(torch.rand(2, 6), 2, 4)


def test_pooled_mask_lets_rows_of_a_cluster_compete():
    s = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8], [10, 20, 30, 40], [50, 60, 70, 80]])
    keep = G.pooled_mask(s, torch.tensor([0, 0, 1, 1]), 0.5)
    assert keep.tolist() == [[False] * 4, [True] * 4, [False] * 4, [True] * 4]
    # one cluster = one pool over the layer, with the per-row total
    keep = G.pooled_mask(s, torch.zeros(4, dtype=torch.long), 0.5)
    assert keep.tolist() == [[False] * 4, [False] * 4, [True] * 4, [True] * 4]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_exact_counts(sparsity):
    s = torch.rand(12, 40, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2] * 4)
    assert (~G.row_mask(s, sparsity)).sum(1).eq(int(40 * sparsity)).all()
    assert (~G.layer_mask(s, sparsity)).sum() == int(480 * sparsity)
    assert (~G.pooled_mask(s, labels, sparsity)).sum() == 12 * int(40 * sparsity)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_validity(pattern):
    n, m = G.parse_pattern(pattern)
    keep = G.nm_mask(torch.randn(16, 64), n, m)
    assert keep.reshape(16, -1, m).sum(-1).eq(n).all()


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "4:4", "a:b", ""])
def test_parse_pattern_rejects(bad):
    with pytest.raises(ValueError, match="pattern"):
        G.parse_pattern(bad)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_check_sparsity_rejects(bad):
    with pytest.raises(ValueError, match="sparsity"):
        G.check_sparsity(bad)


def test_clusters_find_blocks_of_different_scale_and_stay_one_when_homogeneous():
    g = torch.Generator().manual_seed(0)
    # a fused projection: three chunks of rows whose weights differ in scale by 10x
    w = torch.cat([torch.randn(20, 32, generator=g) * s for s in (0.01, 0.1, 1.0)])
    energy = torch.ones(32)
    labels = G.cluster_rows(G.row_features(w, energy), max_clusters=6, seed=0)
    assert len(labels.unique()) == 3
    for chunk in labels.reshape(3, 20):
        assert len(chunk.unique()) == 1
    homogeneous = G.cluster_rows(G.row_features(torch.randn(60, 32, generator=g), energy), seed=0)
    assert homogeneous.unique().tolist() == [0]


def test_clusters_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(100, 2, generator=g) + torch.tensor([[4.0, 0.0]]) * (torch.arange(100) % 2).unsqueeze(1)
    assert torch.equal(G.cluster_rows(f, seed=3), G.cluster_rows(f, seed=3))


@pytest.mark.parametrize("kind", ["uniform", "heavy", "ties", "sorted", "zeros"])
def test_long_pool_threshold_is_kthvalue_exactly(kind):
    """A pool long enough to have its threshold bracketed from a sample gets exactly
    ``kthvalue``'s value: in the middle (the bracket holds it) and at both ends (the sample's
    extremes bracket nothing below the minimum or above the maximum, so the full selection runs);
    and the pooled mask keeps every tie the stable order keeps."""
    g = torch.Generator().manual_seed(1)
    n = G._LONG + 12345
    s = {"uniform": torch.rand(n, generator=g), "heavy": torch.randn(n, generator=g).exp().pow(3),
         "ties": torch.randint(0, 7, (n,), generator=g).float(), "sorted": torch.arange(n).float(),
         "zeros": torch.cat([torch.zeros(n // 2), torch.rand(n - n // 2, generator=g)])}[kind]
    for k in (1, 2, n // 3, n // 2, n // 2 + 1, n - 1, n):
        assert torch.equal(G._kth_lowest(s, k), s.kthvalue(k).values), k
    k = n // 2
    keep = G._prune_lowest(s.view(1, -1), k)[0]
    order = torch.sort(s, stable=True).indices  # the reference: the k first in stable order go
    expected = torch.ones(n, dtype=torch.bool)
    expected[order[:k]] = False
    assert torch.equal(keep, expected)
