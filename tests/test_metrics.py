"""Ground-truth metrics on small inputs with answers worked out by hand."""

import pytest
import torch

from diffattr.metrics import (
    average_precision,
    bootstrap_lds,
    first_relevant_rank,
    linear_datamodeling_score,
    recall_at_k,
    spearman,
    top1_rate,
)

SCORES = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.8, 0.1]])
RELEVANT = torch.tensor([[False, False, True, True], [True, False, True, False]])


def test_first_relevant_rank_and_top1_with_ties_counted_against():
    # Query 0: relevant 0.5 is behind 0.9 → rank 2. Query 1: relevant 0.8 ties irrelevant 0.8 → rank 2.
    assert first_relevant_rank(SCORES, RELEVANT).tolist() == [2, 2]
    assert top1_rate(SCORES, RELEVANT) == 0.0
    assert top1_rate(torch.tensor([[0.1, 0.9]]), torch.tensor([[False, True]])) == 1.0


def test_recall_at_k():
    # Query 0 top-2 = {0, 2}: 1 of 2 relevant; query 1 top-2 = {1, 2}: 1 of 2.
    assert recall_at_k(SCORES, RELEVANT, 2) == pytest.approx(0.5)
    assert recall_at_k(SCORES, RELEVANT, 4) == pytest.approx(1.0)


def test_average_precision():
    # Query 0 order 0,2,3,1: hits at ranks 2 and 3 → (1/2 + 2/3) / 2.
    # Query 1 order 1,2,0,3 (stable ties): hits at ranks 2 and 3 → (1/2 + 2/3) / 2.
    expected = (1 / 2 + 2 / 3) / 2
    assert average_precision(SCORES, RELEVANT).tolist() == pytest.approx([expected, expected])
    perfect = average_precision(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[True, True, False]]))
    assert perfect.item() == pytest.approx(1.0)


def test_spearman_matches_known_values_and_handles_ties():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    assert spearman(x, x * 10).item() == pytest.approx(1.0)
    assert spearman(x, -x).item() == pytest.approx(-1.0)
    # scipy.stats.spearmanr([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) = 0.8207826816681233
    assert spearman(x, torch.tensor([[5.0, 6.0, 7.0, 8.0, 7.0]])).item() == pytest.approx(0.8207826816681233)


def test_lds_is_one_when_scores_explain_the_losses_exactly():
    generator = torch.Generator().manual_seed(0)
    subsets = torch.rand(30, 12, generator=generator) < 0.5
    scores = torch.rand(3, 12, generator=generator)
    losses = 5 - (subsets.double() @ scores.double().T)  # more helpful members → lower loss
    assert linear_datamodeling_score(scores, subsets, losses).tolist() == pytest.approx([1.0] * 3)
    assert linear_datamodeling_score(-scores, subsets, losses).tolist() == pytest.approx([-1.0] * 3)
    mean, spread = bootstrap_lds(scores, subsets, losses, samples=20)
    assert mean == pytest.approx(1.0) and spread == pytest.approx(0.0, abs=1e-9)


def test_ranks_share_the_mean_rank_of_ties_like_scipy():
    from scipy.stats import rankdata

    from diffattr.metrics import _ranks

    generator = torch.Generator().manual_seed(0)
    for values in (torch.randint(0, 4, (6, 40), generator=generator).double(), torch.randn(3, 50, generator=generator)):
        assert torch.equal(_ranks(values), torch.from_numpy(rankdata(values.numpy(), axis=-1)))
    assert _ranks(torch.tensor([[2.0, 2.0, 2.0]])).tolist() == [[2.0, 2.0, 2.0]]
