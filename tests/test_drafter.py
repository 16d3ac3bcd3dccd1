import torch
import pytest

from engine.worker.drafter import NgramDrafter


def test_ngram_proposes_continuation_of_latest_match():
    d = NgramDrafter(1, 3)
    seq = torch.tensor([5, 6, 7, 8, 1, 5, 6, 7])
    drafts, q = d.propose(None, None, None, None, 2, [seq])
    assert q is None
    assert drafts.tolist() == [[8, 1]]


def test_ngram_no_match_and_short_tail():
    d = NgramDrafter(1, 2)
    drafts, _ = d.propose(None, None, None, None, 3, [torch.tensor([1, 2, 3]), torch.tensor([4, 9, 4])])
    assert drafts.tolist() == [[-1, -1, -1], [9, 4, -1]]


def test_ngram_bad_args():
    with pytest.raises(ValueError):
        NgramDrafter(0, 2)
    with pytest.raises(ValueError):
        NgramDrafter().propose(None, None, None, None, 2, None)
