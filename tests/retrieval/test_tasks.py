"""Generated recommendation and multi-hop QA pools, and the all-MiniLM-L6-v2 first-stage encoder."""

import pytest
import torch

from retrieval.tasks import catalogue, multihop_qa, recommendation


@pytest.fixture(scope="module")
def cat():
    return catalogue(num_items=120, seed=0)


def test_recommendation_pools(cat):
    samples = recommendation(30, seed=1, cat=cat)
    assert samples == recommendation(30, seed=1, cat=cat)  # seeded
    for s in samples:
        assert len(s["items"]) == len(set(s["items"])) == 20
        assert not set(s["items"]) & set(s["history"])  # never recommend what was watched
        grades = sorted(g for g in s["relevance"] if g > 0)
        assert 1 <= len(grades) <= 3 and grades[-1] == 2.0 and grades.count(2.0) == 1
        assert "[20]" in s["prompt"] and "<slate>" in s["prompt"]
    # the relevant items are the unseen ones with the highest dot product with the (noisy) user vector: their
    # latent vectors score higher with the history mean than the average candidate does
    rel = [torch.tensor(s["first_stage"])[torch.tensor(s["relevance"]) > 0].mean() for s in samples]
    rest = [torch.tensor(s["first_stage"]).mean() for s in samples]
    assert torch.stack(rel).mean() > torch.stack(rest).mean()


def test_multihop_pools():
    samples = multihop_qa(30, seed=2)
    for s in samples:
        assert len(set(s["candidates"])) == 20
        assert 2 <= sum(s["relevance"]) <= 4
        support = [c for c, g in zip(s["candidates"], s["relevance"]) if g > 0]
        question = s["prompt"].split("\n")[0]
        if question.startswith("Question: In which country was"):
            # 2-hop: "X was born in C." and "C is a city in K."
            city = next(c for c in support if " was born in " in c).split(" was born in ")[1].rstrip(".")
            assert any(c.startswith(f"{city} is a city in") for c in support)


def test_minilm_encoder_loads_offline_and_ranks_by_meaning():
    from retrieval.embedding import MiniLMEncoder

    enc = MiniLMEncoder()
    e = enc.encode(["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    s = enc.scores(["A man is eating food."], ["A man is eating a piece of bread.", "The girl is carrying a baby."])
    assert s[0, 0] > 0.5 > s[0, 1]  # all-MiniLM-L6-v2: ~0.76 vs ~-0.1
