"""How far a sentence embedder is from its teacher, and what it is worth downstream: the text-embedding
task's evaluation (`distill.tasks.text_embedding`), also used by `benchmarks/text_embedding.py`.

- `teacher_cosine`: mean cosine between a text's student and teacher embeddings (1: the same direction);
- `spearman`: Spearman's rank correlation between the student's and the teacher's cosine similarities over
  every pair of held-out texts (what sentence-embedding benchmarks score against human ratings; here the
  teacher stands in for the ratings);
- `knn_accuracy` / `knn_f1`: k-nearest-neighbour classification (cosine, k votes, ties to the larger summed
  similarity) of the held-out texts against the training texts' labels;
- `probe_accuracy` / `probe_f1`: a logistic-regression probe fitted on the training texts' embeddings
  (L2-normalised, then standardised per dimension);
- `ndcg_at_10`: retrieval with one relevant passage per query (nDCG@10 = 1 / log2(1 + rank) when the
  passage ranks in the top 10, else 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from distill.metrics import macro_f1

KNN_NEIGHBOURS = 10
SPEARMAN_TEXTS = 1000  # pairs grow with the square; 1,000 texts are 499,500 pairs


@torch.inference_mode()
def embed(model: nn.Module, ids: Tensor, pad_id: int, batch_size: int = 128) -> Tensor:
    """Float32 embeddings of right-padded token ids, in order; texts are batched by length (less padding)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = (ids != pad_id).sum(1).argsort(descending=True)
    out: Tensor | None = None
    try:
        for start in range(0, len(ids), batch_size):
            rows = order[start : start + batch_size]
            vectors = model(ids[rows].to(device)).float().cpu()
            if out is None:
                out = torch.empty(len(ids), vectors.shape[-1])
            out[rows] = vectors
    finally:
        model.train(was_training)
    return out if out is not None else torch.empty(0, 0)


def mean_cosine(student: Tensor, teacher: Tensor) -> float:
    return float(F.cosine_similarity(student.double(), teacher.double(), dim=-1).mean())


def ranks(values: Tensor) -> Tensor:
    """0-based ranks (ties broken by position: the similarities compared here are continuous)."""
    order = values.argsort()
    out = torch.empty_like(order, dtype=torch.float64)
    out[order] = torch.arange(len(values), dtype=torch.float64)
    return out


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rho: the Pearson correlation of the ranks."""
    ra, rb = ranks(a.flatten()), ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


def pair_similarities(embeddings: Tensor) -> Tensor:
    """Cosine similarity of every unordered pair of rows (the upper triangle)."""
    unit = F.normalize(embeddings.double(), dim=-1)
    rows, cols = torch.triu_indices(len(unit), len(unit), offset=1)
    return (unit @ unit.T)[rows, cols]


def similarity_spearman(student: Tensor, teacher: Tensor, limit: int = SPEARMAN_TEXTS) -> float:
    """Spearman's rho between student and teacher pair similarities over the first `limit` texts."""
    return spearman(pair_similarities(student[:limit]), pair_similarities(teacher[:limit]))


def knn_scores(train: Tensor, labels: Tensor, test: Tensor, classes: int, k: int = KNN_NEIGHBOURS) -> Tensor:
    """(test, classes) vote scores: each of the k nearest training texts (cosine) votes for its label; a
    tie is broken by the summed similarity (its share is < 1, a whole vote)."""
    similar = F.normalize(test.float(), dim=-1) @ F.normalize(train.float(), dim=-1).T
    top, index = similar.topk(min(k, len(train)), dim=-1)
    votes = F.one_hot(labels[index], classes).float()
    return votes.sum(1) + (votes * top[..., None]).sum(1) / (2 * k + 1)


def linear_probe(train: Tensor, labels: Tensor, test: Tensor, classes: int, seed: int = 0) -> Tensor:
    """(test, classes) scores of a logistic regression (C 1) fitted on the training embeddings, L2-normalised
    then standardised with the training texts' mean and deviation per dimension (an untrained encoder's
    vectors point nearly one way: unscaled, the probe would see little but their common direction)."""
    from sklearn.linear_model import LogisticRegression

    x, y = F.normalize(train.double(), dim=-1), F.normalize(test.double(), dim=-1)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x, y = (x - mean) / std, (y - mean) / std
    probe = LogisticRegression(max_iter=2000, C=1.0, random_state=seed).fit(x.numpy(), labels.numpy())
    scores = torch.full((len(test), classes), -math.inf, dtype=torch.float64)
    fitted = torch.from_numpy(probe.decision_function(y.numpy()))
    if fitted.dim() == 1:  # binary: one margin for the second class
        fitted = torch.stack([-fitted, fitted], dim=1)
    scores[:, torch.as_tensor(probe.classes_)] = fitted
    return scores


def label_metrics(
    train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, classes: int
) -> dict[str, float]:
    knn = knn_scores(train, train_labels, test, classes)
    probe = linear_probe(train, train_labels, test, classes)
    return {
        "knn_accuracy": float((knn.argmax(-1) == test_labels).float().mean()),
        "knn_f1": macro_f1(knn, test_labels, classes),
        "probe_accuracy": float((probe.argmax(-1) == test_labels).float().mean()),
        "probe_f1": macro_f1(probe, test_labels, classes),
    }


def ndcg_at_10(queries: Tensor, docs: Tensor, positive: Tensor) -> float:
    """Mean nDCG@10 of cosine retrieval with one relevant passage per query (`positive[i]` for query i)."""
    similar = F.normalize(queries.float(), dim=-1) @ F.normalize(docs.float(), dim=-1).T
    relevant = similar.gather(1, positive[:, None])
    rank = (similar > relevant).sum(1)  # 0-based rank of the relevant passage (ties in its favour)
    gains = torch.where(
        rank < 10, 1.0 / torch.log2(rank.double() + 2.0), torch.zeros((), dtype=torch.float64)
    )
    return float(gains.mean())
