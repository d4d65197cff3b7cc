"""Targets and training data for the draft: a synthetic order-2 Markov source with a tiny target trained on it
(the controllable setting of methods/domains.md §6.6), and SmolLM2's own greedy responses to generated prompts.

Draft training data is *target-aligned*: sequences the target itself would produce (EAGLE-3 regenerates its
ShareGPT/UltraChat responses with the target). A batch is a dict ``{"input_ids": (B, S) long, "valid": (B, S)
bool}`` (right padding). Targets are HF causal LMs; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from common.models import BundledSmolLM2, PolicySource, cache_dir
from common.progress import progress

__all__ = ["MarkovSource", "MarkovTarget", "MarkovCorpus", "SelfGeneratedResponses", "generated_prompts", "chat_ids",
           "self_generated"]


class MarkovSource:
    """Order-2 Markov chain over ``vocab_size`` symbols: every context (a, b) puts Dirichlet(alpha) mass on
    ``support`` random tokens (alpha = 0.5: some contexts near-deterministic, some spread over 2-3 tokens).

    Shapes: ``probs`` (V, V, V) with probs[a, b, c] = P(c | a, b).
    """

    def __init__(self, vocab_size: int = 64, support: int = 4, alpha: float = 0.5, seed: int = 0):
        if support > vocab_size or support < 1:
            raise ValueError(f"support must be in [1, vocab_size={vocab_size}], got {support}")
        self.vocab_size = vocab_size
        g = torch.Generator().manual_seed(seed)
        V = vocab_size
        tokens = torch.rand(V, V, V, generator=g).argsort(-1)[..., :support]  # (V, V, support) distinct tokens
        with torch.random.fork_rng(devices=[]):  # Dirichlet sampling takes no generator: seed a forked global RNG
            torch.manual_seed(seed)
            weights = torch.distributions.Dirichlet(torch.full((support,), alpha)).sample((V, V))  # (V, V, support)
        self.probs = torch.zeros(V, V, V).scatter_(-1, tokens, weights)  # (V, V, V)

    def sample(self, n: int, length: int, seed: int) -> Tensor:
        """n sequences of ``length`` tokens (first two uniform). -> (n, length) long."""
        g = torch.Generator().manual_seed(seed)
        x = torch.empty(n, length, dtype=torch.long)
        x[:, :2] = torch.randint(0, self.vocab_size, (n, 2), generator=g)
        for t in range(2, length):  # a loop over positions of synthetic data, run once per corpus
            x[:, t] = torch.multinomial(self.probs[x[:, t - 2], x[:, t - 1]], 1, generator=g)[:, 0]
        return x

    def entropy_rate(self, x: Tensor) -> Tensor:
        """Mean next-token entropy of the source (nats) on the positions t >= 2 of x (n, length)."""
        p = self.probs[x[:, :-2], x[:, 1:-1]]  # (n, length-2, V)
        return -(p * p.clamp(min=1e-12).log()).sum(-1).mean()


def _train_markov_target(source: MarkovSource, hidden_size: int, num_layers: int, num_heads: int, seq_len: int,
                         train_steps: int, batch_size: int, lr: float, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    V = source.vocab_size
    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                      max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        data = source.sample(10000, seq_len, seed=seed + 1)  # the spec's 10 k training sequences
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        for _ in progress(range(train_steps), "speculative: training the Markov target, steps"):
            x = data[torch.randint(0, len(data), (batch_size,))]
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.generation_config.eos_token_id = None
    return model.eval()


class MarkovTarget(PolicySource):
    """A tiny Llama target trained on the Markov source, cached under ``$ADVLAB_CACHE/speculative/`` (trained on
    first use, a minute or two at the defaults). ``load() -> (model, None)`` (no tokenizer: tokens are symbols).

    The spec's vocabulary is 64; 32 is the default here: with 32² contexts the 0.1 M-parameter target learns the
    source (cross-entropy 1.05 nats vs the source's 0.90) in 600 steps, while 64² contexts needed several times
    more steps than a shared 2-core CPU allows.

    Args: the source (vocab_size, support, alpha, source_seed), the model (hidden_size, num_layers, num_heads) and
    its training (seq_len, train_steps, batch_size, lr, seed).
    """

    def __init__(self, vocab_size: int = 32, support: int = 4, alpha: float = 0.5, source_seed: int = 0,
                 hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seq_len: int = 64,
                 train_steps: int = 600, batch_size: int = 64, lr: float = 3e-3, seed: int = 0):
        self.kwargs = dict(vocab_size=vocab_size, support=support, alpha=alpha, source_seed=source_seed,
                           hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, seq_len=seq_len,
                           train_steps=train_steps, batch_size=batch_size, lr=lr, seed=seed)

    def source(self) -> MarkovSource:
        k = self.kwargs
        return MarkovSource(k["vocab_size"], k["support"], k["alpha"], k["source_seed"])

    def path(self) -> Path:
        key = hashlib.sha256(json.dumps(self.kwargs, sort_keys=True).encode()).hexdigest()[:12]
        return cache_dir() / "speculative" / f"markov-target-{key}"

    def load(self):
        from transformers import LlamaForCausalLM

        path = self.path()
        if (path / "model.safetensors").exists():
            return LlamaForCausalLM.from_pretrained(path).eval(), None
        k = self.kwargs
        model = _train_markov_target(self.source(), k["hidden_size"], k["num_layers"], k["num_heads"], k["seq_len"],
                                     k["train_steps"], k["batch_size"], k["lr"], k["seed"])
        tmp = path.with_name(path.name + f".tmp{torch.randint(0, 1 << 30, ()).item()}")
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            tmp.rename(path)  # atomic; a concurrent first load that lost the race keeps its own copy
        except OSError:
            pass
        return model, None


class _Sequences(Dataset):
    def __init__(self, ids: Tensor, valid: Tensor):
        self.ids, self.valid = ids, valid

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "valid": self.valid[i]}


class MarkovCorpus(L.LightningDataModule):
    """Sequences from the Markov source (the same source arguments as the target's ``MarkovTarget``).

    Args:
        vocab_size, support, alpha, source_seed: the source.
        seq_len: tokens per sequence. train_size / val_size: sequences. batch_size: sequences per step.
        seed: sampling seed of the corpus (the held-out split uses seed + 1).
    """

    def __init__(self, vocab_size: int = 32, support: int = 4, alpha: float = 0.5, source_seed: int = 0,
                 seq_len: int = 64, train_size: int = 10000, val_size: int = 1000, batch_size: int = 16, seed: int = 100):
        super().__init__()
        self.source = MarkovSource(vocab_size, support, alpha, source_seed)
        self.seq_len, self.train_size, self.val_size = seq_len, train_size, val_size
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        x = self.source.sample(self.train_size, self.seq_len, self.seed)
        v = self.source.sample(self.val_size, self.seq_len, self.seed + 1)
        self.train = _Sequences(x, torch.ones_like(x, dtype=torch.bool))
        self.val = _Sequences(v, torch.ones_like(v, dtype=torch.bool))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)


_TOPICS = ["the ocean", "a robot", "coffee", "the moon", "a library", "mountains", "a city at night", "rain",
           "a small dog", "the history of bread", "learning to swim", "a train journey", "volcanoes", "music",
           "friendship", "a garden", "winter", "computers", "the desert", "birds", "the stars", "a lighthouse",
           "chess", "the first day of school", "honey bees", "a forest fire", "bicycles", "the human heart",
           "a snowstorm", "an old castle", "tea", "the internet", "a market", "elephants", "a thunderstorm",
           "cooking pasta", "the river", "a birthday party", "photography", "the autumn leaves", "a spaceship",
           "recycling", "a museum", "the wind", "dinosaurs", "a quiet village", "football", "the sun", "penguins",
           "a haunted house", "electric cars", "the rainforest", "a bakery", "sleep", "a lost key",
           "the pyramids", "whales", "a painter", "clouds", "a farm"]
_TEMPLATES = ["Write a short story about {t}.", "Explain {t} to a child.", "Write a poem about {t}.",
              "Give three facts about {t}.", "Describe {t} in a few sentences.", "Why do people like {t}?",
              "Write a short blog post about {t}.", "What are the pros and cons of {t}?",
              "Write a letter to a friend about {t}.", "Tell me something surprising about {t}.",
              "Summarise what you know about {t}.", "Write a dialogue between two people about {t}."]


def generated_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` chat prompts from templates x topics (plus small arithmetic questions), shuffled by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    pool = [t.format(t=topic) for t in _TEMPLATES for topic in _TOPICS]
    pool += [f"What is {a} + {b}? Explain step by step." for a in range(3, 40, 7) for b in range(5, 60, 11)]
    order = torch.randperm(len(pool), generator=g).tolist()
    return [pool[order[i % len(pool)]] for i in range(n)]


def chat_ids(tokenizer, prompt: str) -> Tensor:
    """A user turn through the tokenizer's chat template, ready for the assistant's reply. -> (1, P) long."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def self_generated(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 1) -> list[Tensor]:
    """Chat-formatted prompt + the target's own greedy response, one 1-D token tensor per prompt.

    ``batch_size`` 1 decodes each prompt alone (:func:`speculative.decode.greedy_decode`, bit-exact batch-1
    greedy); larger batches left-pad and call HF ``generate`` (greedy), many times faster on a CPU for data
    generation; a reduced-precision target may then differ from batch-1 greedy at near-ties of its logits.
    """
    from speculative.decode import greedy_decode

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chats = [chat_ids(tokenizer, p)[0] for p in prompts]
    eos = tokenizer.eos_token_id
    out = []
    for i in progress(range(0, len(chats), batch_size), "speculative: target responses, batches"):
        chunk = chats[i : i + batch_size]
        if batch_size == 1:
            out.append(torch.cat([chunk[0], greedy_decode(model, chunk[0][None], max_new_tokens, eos)[0]]))
            continue
        P = max(len(c) for c in chunk)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        ids = torch.full((len(chunk), P), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), P, dtype=torch.long)
        for j, c in enumerate(chunk):  # left padding, once per data set
            ids[j, P - len(c) :], mask[j, P - len(c) :] = c, 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)[:, P:]  # (b, <= max_new_tokens)
        for c, g in zip(chunk, gen):
            hits = (g == eos).nonzero()
            g = g[: int(hits[0, 0]) + 1] if len(hits) else g
            out.append(torch.cat([c, g]))
    return out


class SelfGeneratedResponses(L.LightningDataModule):
    """Generated prompts with the target's own greedy responses (cached once under ``$ADVLAB_CACHE``).

    Args:
        policy: the target (default the bundled SmolLM2-135M-Instruct).
        train_size / val_size: prompts. max_new_tokens: response length cap. batch_size: sequences per step.
        seed: prompt order.
    """

    def __init__(self, policy: PolicySource | None = None, train_size: int = 256, val_size: int = 16,
                 max_new_tokens: int = 96, batch_size: int = 4, seed: int = 0):
        super().__init__()
        self.policy = policy if policy is not None else BundledSmolLM2()
        self.train_size, self.val_size, self.max_new_tokens = train_size, val_size, max_new_tokens
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        n = self.train_size + self.val_size
        prompts = generated_prompts(n, self.seed)
        key = f"{type(self.policy).__name__}-{vars(self.policy)}-{prompts}-{self.max_new_tokens}"
        path = cache_dir() / "speculative" / f"responses-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
        if path.exists():
            seqs = torch.load(path, weights_only=True)
        else:
            model, tok = self.policy.load()
            seqs = self_generated(model.eval(), tok, prompts, self.max_new_tokens)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(seqs, path)
        ids, valid = pad_right(seqs)
        self.train = _Sequences(ids[: self.train_size], valid[: self.train_size])
        self.val = _Sequences(ids[self.train_size :], valid[self.train_size :])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)


def pad_right(seqs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """1-D token tensors -> ids (n, S) right-padded with 0, valid (n, S) bool."""
    S = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), S, dtype=torch.long)
    valid = torch.zeros(len(seqs), S, dtype=torch.bool)
    for i, s in enumerate(seqs):  # once per data set
        ids[i, : len(s)], valid[i, : len(s)] = s, True
    return ids, valid
