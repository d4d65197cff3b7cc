"""Generated generate-and-rank tasks: sequential recommendation and multi-hop QA (seeded, no downloads).

Every task is a query plus a pool of ``pool_size`` candidates (ids 1..N in the prompt) with graded relevance;
the pool holds the relevant items, hard distractors (the first-stage retriever's best non-relevant
candidates) and random fill, shuffled. A sample dict carries ``prompt``, ``relevance`` (grade of id i at
``i-1``), ``candidates`` (candidate texts), ``first_stage`` (the retriever's score of each candidate: the
non-LLM ranking baseline), ``max_slate``, ``rank_k`` and ``task``.

* Recommendation (the spec's synthetic recommender, arXiv 2605.12995 §(e)): items have latent vectors and
  readable titles built from their strongest latent attributes; a user's history is drawn by taste, the user
  vector is the history's mean plus noise, and the relevant set is the 1-3 unseen items with the highest dot
  product (grade 2 for the best, 1 for the others).
* Multi-hop QA: a synthetic world of people, companies, cities and countries written as one-sentence
  passages; 2-hop (birth country), 3-hop (country of the employer's headquarters) and 4-passage comparison
  questions; the supporting passages are relevant (grade 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Title words of each latent attribute: (word when the attribute is positive, word when negative).
ATTRIBUTE_WORDS = [("Midnight", "Sunrise"), ("Ocean", "Desert"), ("Robot", "Dragon"), ("Love", "War"),
                   ("City", "Village"), ("Winter", "Summer"), ("Ghost", "Hero"), ("Jazz", "Rock")]
NOUNS = ["Tales", "Story", "Chronicles", "Diaries", "Legends", "Nights", "Songs", "Files"]

Scorer = Callable[[Sequence[str], Sequence[str]], Tensor]  # (queries Q, documents D) -> (Q, D) similarity


@dataclass
class Catalogue:
    vectors: Tensor  # (I, d) latent item vectors
    titles: list[str]  # (I,)


def catalogue(num_items: int = 200, dim: int = 8, seed: int = 0) -> Catalogue:
    """Items with latent vectors and titles naming their two strongest attributes (so text carries signal)."""
    if dim > len(ATTRIBUTE_WORDS):
        raise ValueError(f"dim must be <= {len(ATTRIBUTE_WORDS)} (one title word pair per attribute), got {dim}")
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(num_items, dim, generator=g)  # (I, d)
    top = v.abs().topk(2, dim=1).indices.tolist()  # (I, 2)
    titles = []
    for i, (a, b) in enumerate(top):
        wa = ATTRIBUTE_WORDS[a][0 if v[i, a] > 0 else 1]
        wb = ATTRIBUTE_WORDS[b][0 if v[i, b] > 0 else 1]
        titles.append(f"{wa} {wb} {NOUNS[i % len(NOUNS)]} {i}")
    return Catalogue(v, titles)


def _pool(relevant: list[int], ranked_others: list[int], everything: list[int], pool_size: int, num_hard: int,
          g: torch.Generator) -> list[int]:
    """relevant + the best ``num_hard`` non-relevant by first-stage score + random fill, shuffled."""
    chosen = list(relevant) + [i for i in dict.fromkeys(ranked_others) if i not in relevant][:num_hard]
    taken = set(chosen)
    rest = [i for i in everything if i not in taken]
    fill = torch.randperm(len(rest), generator=g)[: pool_size - len(chosen)].tolist()
    pool = chosen + [rest[j] for j in fill]
    order = torch.randperm(len(pool), generator=g).tolist()
    return [pool[j] for j in order]


def _prompt(query: str, candidates: Sequence[str], what: str, max_slate: int, rank_k: int) -> str:
    lines = "\n".join(f"[{i + 1}] {c}" for i, c in enumerate(candidates))
    return (f"{query}\nCandidates:\n{lines}\n{what} Answer as <slate> ids </slate> <rank> ids </rank>: a slate of at "
            f"most {max_slate} candidate ids, then your best {rank_k} of them in order.")


def recommendation(n: int, seed: int, *, cat: Catalogue, history_len: int = 5, pool_size: int = 20,
                   num_hard: int = 5, max_slate: int = 10, rank_k: int = 5, taste: float = 2.0, noise: float = 0.5,
                   scorer: Scorer | None = None) -> list[dict]:
    """``n`` users: history -> next items. ``scorer`` (e.g. the sentence-embedding model) ranks the catalogue by
    the history's titles to pick hard distractors and give the first-stage scores; None = latent dot product."""
    g = torch.Generator().manual_seed(seed)
    I, d = cat.vectors.shape
    taste_vec = torch.randn(n, d, generator=g)  # (n, d)
    logits = taste * taste_vec @ cat.vectors.T  # (n, I)
    history = torch.multinomial(torch.softmax(logits, 1), history_len, generator=g)  # (n, h) without replacement
    user = cat.vectors[history].mean(1) + noise * torch.randn(n, d, generator=g)  # (n, d)
    true = (user @ cat.vectors.T).scatter(1, history, float("-inf"))  # (n, I) unseen items only
    if scorer is not None:
        queries = ["; ".join(cat.titles[j] for j in h) for h in history.tolist()]
        first = scorer(queries, cat.titles)  # (n, I)
    else:
        first = cat.vectors[history].mean(1) @ cat.vectors.T  # (n, I) what the history alone says
    first = first.scatter(1, history, float("-inf"))
    num_rel = torch.randint(1, 4, (n,), generator=g).tolist()
    out = []
    for u in range(n):  # ok: task generation, once per data set
        relevant = true[u].topk(num_rel[u]).indices.tolist()
        ranked = first[u].argsort(descending=True).tolist()
        seen = set(history[u].tolist())
        pool = _pool(relevant, ranked, [i for i in range(I) if i not in seen], pool_size, num_hard, g)
        grade = {j: (2.0 if k == 0 else 1.0) for k, j in enumerate(relevant)}
        titles = [cat.titles[j] for j in pool]
        query = "A user watched, in order: " + "; ".join(cat.titles[j] for j in history[u].tolist()) + "."
        out.append(dict(
            prompt=_prompt(query, titles, "Which candidates will the user watch next?", max_slate, rank_k),
            relevance=[grade.get(j, 0.0) for j in pool], candidates=titles, first_stage=first[u, pool].tolist(),
            items=pool, history=history[u].tolist(), max_slate=max_slate, rank_k=rank_k, task="recommendation"))
    return out


FIRST = ["Ada", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Keiko", "Liam",
         "Maya", "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara"]
LAST = ["Alder", "Brook", "Castell", "Dorne", "Ewing", "Falk"]
CITIES = ["Arlen", "Belmora", "Corvath", "Dunmere", "Eskel", "Farrow", "Glenhal", "Harwick", "Istra", "Jorvik",
          "Kelso", "Lindor", "Marrow", "Norhal", "Ostrel", "Pellor"]
COUNTRIES = ["Valdoria", "Westmark", "Zembla", "Quorvia", "Ruritania", "Sylvania"]
COMPANIES = ["Apex Mills", "Blue Forge", "Cinder Labs", "Delta Looms", "Ember Works", "Flint Optics", "Gale Motors",
             "Helix Foods"]


def multihop_qa(n: int, seed: int, *, pool_size: int = 20, num_hard: int = 5, max_slate: int = 10, rank_k: int = 5,
                scorer: Scorer | None = None) -> list[dict]:
    """``n`` questions over one seeded world; 2, 3 or 4 supporting passages among ``pool_size``."""
    g = torch.Generator().manual_seed(seed)

    def pick(xs: Sequence[str]) -> str:
        return xs[int(torch.randint(len(xs), (1,), generator=g))]

    people = [f"{f} {l}" for f in FIRST for l in LAST]
    country = {c: pick(COUNTRIES) for c in CITIES}
    hq = {c: pick(CITIES) for c in COMPANIES}
    born = {p: pick(CITIES) for p in people}
    works = {p: pick(COMPANIES) for p in people}
    studied = {p: pick(CITIES) for p in people}
    passages: list[str] = []
    key: dict[tuple, int] = {}

    def add(kind: str, subject: str, text: str) -> None:
        key[(kind, subject)] = len(passages)
        passages.append(text)

    for c in CITIES:
        add("in", c, f"{c} is a city in {country[c]}.")
    for c in COMPANIES:
        add("hq", c, f"{c} is headquartered in {hq[c]}.")
    for p in people:
        add("born", p, f"{p} was born in {born[p]}.")
        add("works", p, f"{p} works for {works[p]}.")
        add("studied", p, f"{p} studied in {studied[p]}.")
    questions = []
    for _ in range(n):  # ok: task generation
        kind = int(torch.randint(3, (1,), generator=g))
        p = pick(people)
        if kind == 0:
            q, support = f"In which country was {p} born?", [key[("born", p)], key[("in", born[p])]]
            near = [key[("studied", p)], key[("works", p)], key[("in", studied[p])]]
        elif kind == 1:
            q = f"In which country is the headquarters of the company {p} works for?"
            support = [key[("works", p)], key[("hq", works[p])], key[("in", hq[works[p]])]]
            near = [key[("born", p)], key[("studied", p)], key[("in", born[p])]]
        else:
            p2 = pick([x for x in people if x != p])
            q = f"Were {p} and {p2} born in the same country?"
            support = list(dict.fromkeys([key[("born", p)], key[("in", born[p])], key[("born", p2)], key[("in", born[p2])]]))
            near = [key[("studied", p)], key[("studied", p2)], key[("works", p)]]
        questions.append((q, support, near))
    if scorer is not None:
        first = scorer([q for q, _, _ in questions], passages)  # (n, D)
    else:  # lexical overlap with the question
        bags = [set(s.rstrip(".").split()) for s in passages]
        first = torch.tensor([[float(len(set(q.replace("?", "").split()) & b)) for b in bags] for q, _, _ in questions])
    out = []
    for (q, support, near), f in zip(questions, first):  # ok: task generation
        ranked = near + f.argsort(descending=True).tolist()
        pool = _pool(support, ranked, list(range(len(passages))), pool_size, num_hard, g)
        texts = [passages[j] for j in pool]
        out.append(dict(
            prompt=_prompt(f"Question: {q}", texts, "Which passages are needed to answer it?", max_slate, rank_k),
            relevance=[1.0 if j in support else 0.0 for j in pool], candidates=texts,
            first_stage=f[pool].tolist(), items=pool, max_slate=max_slate, rank_k=rank_k, task="multihop_qa"))
    return out
