"""Feature and relation losses (`distill.losses.features`, `distill.losses.relations`): float64 references
written from the papers / official code, torchdistill's loss modules driven through their forward (skipped
when torchdistill is absent), mask == removal, bf16 inputs, finite gradients and invariances."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import distill.losses as L

Tensor = torch.Tensor


def _randn(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def _unit(*shape: int, seed: int) -> Tensor:
    return F.normalize(_randn(*shape, seed=seed), dim=-1)


# ------------------------------------------------------------------ float64 references, written plainly


def ref_hint(s: Tensor, t: Tensor) -> Tensor:
    return ((s - t) ** 2).reshape(s.shape[0], -1).mean(1)


def ref_attention(s: Tensor, t: Tensor, p: float = 2.0, mode: str = "code") -> Tensor:
    def q(x: Tensor) -> Tensor:
        a = (x.abs() ** p).sum(1).reshape(x.shape[0], -1)
        return a / torch.sqrt((a**2).sum(1, keepdim=True))

    diff = q(s) - q(t)
    return (diff**2).mean(1) if mode == "code" else torch.sqrt((diff**2).sum(1))


def ref_fsp_matrix(a: Tensor, b: Tensor) -> Tensor:
    n, c1, h, w = a.shape
    g = torch.zeros(n, c1, b.shape[1], dtype=torch.float64)
    for i in range(c1):
        for j in range(b.shape[1]):
            g[:, i, j] = (a[:, i] * b[:, j]).sum((1, 2)) / (h * w)
    return g


def ref_sp(s: Tensor, t: Tensor, p: int = 2) -> Tensor:
    def g(x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        gram = x @ x.T
        return gram / gram.abs().pow(p).sum(1, keepdim=True).pow(1 / p)

    return ((g(s) - g(t)) ** 2).sum() / s.shape[0] ** 2


def ref_pkt(s: Tensor, t: Tensor, eps: float = 1e-7) -> Tensor:
    n = s.shape[0]

    def cond(x: Tensor) -> Tensor:
        x = x.reshape(n, -1)
        k = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(n):
                cos = (x[i] @ x[j]) / ((x[i].norm() + eps) * (x[j].norm() + eps))
                k[i, j] = (cos + 1) / 2
        return k / k.sum(1, keepdim=True)

    ps, pt = cond(s), cond(t)
    return (pt * torch.log((pt + eps) / (ps + eps))).sum() / n**2


def _huber(a: Tensor, b: Tensor) -> Tensor:
    d = (a - b).abs()
    return torch.where(d < 1, 0.5 * d**2, d - 0.5)


def ref_rkd_distance(s: Tensor, t: Tensor) -> Tensor:
    n = s.shape[0]

    def dist(x: Tensor) -> Tensor:
        x = x.reshape(n, -1)
        d = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(n):
                if i != j:
                    d[i, j] = (x[i] - x[j]).norm()
        return d / (d.sum() / (n * (n - 1)))

    return _huber(dist(s), dist(t)).mean()


def ref_rkd_angle(s: Tensor, t: Tensor) -> Tensor:
    n = s.shape[0]

    def angles(x: Tensor) -> Tensor:
        x = x.reshape(n, -1)
        out = torch.zeros(n, n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if j != i and k != i:
                        e_j = (x[j] - x[i]) / (x[j] - x[i]).norm()
                        e_k = (x[k] - x[i]) / (x[k] - x[i]).norm()
                        out[i, j, k] = e_j @ e_k
        return out

    return _huber(angles(s), angles(t)).mean()


def ref_crd_term(anchor, positive, negatives, z, n_data, temperature, eps=1e-7) -> Tensor:
    """-log(P0 / (P0 + K/n + eps)) - sum_k log((K/n) / (Pk + K/n + eps)), P = exp(v . a / T) / Z."""
    k = negatives.shape[1]
    c = k / n_data
    p0 = torch.exp((positive * anchor).sum(-1) / temperature) / z
    pk = torch.exp((negatives * anchor[:, None, :]).sum(-1) / temperature) / z
    return -torch.log(p0 / (p0 + c + eps)) - torch.log(c / (pk + c + eps)).sum(1)


def ref_contextual(s: Tensor, t: Tensor) -> Tensor:
    """One sample, (T, D) tokens of each model."""

    def cs(x: Tensor) -> Tensor:
        return torch.softmax(x @ x.T / math.sqrt(x.shape[1]), dim=1)

    return ((cs(s) - cs(t)) ** 2).mean()


def ref_trg(
    s: Tensor, t: Tensor, k: int, sigma: float, tau: float, lw: float = 1.0, gw: float = 1.0
) -> Tensor:
    """Nodes (M, D): local KL over the teacher's k-NN (student first), global InfoNCE on cosine."""
    m = s.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(m):
        others = [j for j in range(m) if j != i]
        nbrs = sorted(others, key=lambda j: float((t[i] - t[j]).norm()))[:k]
        a_s = torch.stack([torch.exp(-((s[i] - s[j]) ** 2).sum() / (2 * sigma)) for j in nbrs])
        a_t = torch.stack([torch.exp(-((t[i] - t[j]) ** 2).sum() / (2 * sigma)) for j in nbrs])
        p_s, p_t = torch.softmax(a_s, 0), torch.softmax(a_t, 0)
        local = (p_s * torch.log(p_s / p_t)).sum()
        total = total + lw * local
        if gw:
            cos = torch.stack([(s[i] @ t[j]) / (s[i].norm() * t[j].norm()) for j in range(m)]) / tau
            total = total - gw * torch.log(torch.exp(cos[i]) / torch.exp(cos).sum())
    return total / m


# ------------------------------------------------------------------ (a) against the references


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 7), (2, 5, 6)])
def test_hint_mse_reference_and_nn_mse(shape: tuple[int, ...]) -> None:
    s, t = _randn(*shape, seed=1), _randn(*shape, seed=2)
    lead = shape[:2] if len(shape) == 3 else shape[:1]
    expected = ref_hint(
        s.reshape(-1, shape[-1]) if len(shape) == 3 else s, t.reshape(-1, shape[-1]) if len(shape) == 3 else t
    )
    torch.testing.assert_close(
        L.hint_mse(s, t, reduction="none"), expected.reshape(lead), atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(L.hint_mse(s, t), F.mse_loss(s, t), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_attention_transfer_reference(mode: str, p: float) -> None:
    s, t = _randn(5, 3, 4, 4, seed=3), _randn(5, 6, 4, 4, seed=4)
    got = L.attention_transfer(s, t, p=p, mode=mode, reduction="none")
    torch.testing.assert_close(got, ref_attention(s, t, p, mode), atol=1e-6, rtol=1e-6)


def test_attention_transfer_pools_the_larger_map() -> None:
    s, t = _randn(3, 2, 8, 8, seed=5), _randn(3, 4, 4, 4, seed=6)
    expected = ref_attention(F.adaptive_avg_pool2d(s, (4, 4)), t)
    torch.testing.assert_close(L.attention_transfer(s, t, reduction="none"), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        L.attention_transfer(t, s), L.attention_transfer(t, F.adaptive_avg_pool2d(s, 4))
    )


@pytest.mark.parametrize("distance", ["squared", "mean_squared", "column_norm"])
def test_fsp_reference(distance: str) -> None:
    s1, s2 = _randn(3, 2, 4, 4, seed=7), _randn(3, 3, 4, 4, seed=8)
    t1, t2 = _randn(3, 2, 5, 5, seed=9), _randn(3, 3, 5, 5, seed=10)
    diff = ref_fsp_matrix(s1, s2) - ref_fsp_matrix(t1, t2)
    expected = {
        "squared": (diff**2).sum((1, 2)),
        "mean_squared": (diff**2).mean((1, 2)),
        "column_norm": torch.sqrt((diff**2).sum(1)).sum(1),
    }[distance]
    got = L.fsp(s1, s2, t1, t2, distance=distance, reduction="none")
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_fsp_pools_the_larger_map_of_a_pair() -> None:
    s1, s2 = _randn(2, 2, 8, 8, seed=11), _randn(2, 3, 4, 4, seed=12)
    t1, t2 = _randn(2, 2, 4, 4, seed=13), _randn(2, 3, 4, 4, seed=14)
    for pool, fn in (("max", F.adaptive_max_pool2d), ("avg", F.adaptive_avg_pool2d)):
        diff = ref_fsp_matrix(fn(s1, (4, 4)), s2) - ref_fsp_matrix(t1, t2)
        got = L.fsp(s1, s2, t1, t2, pool=pool, reduction="none")
        torch.testing.assert_close(got, (diff**2).sum((1, 2)), atol=1e-6, rtol=1e-6)


def test_similarity_preserving_pkt_rkd_reference() -> None:
    s, t = _randn(5, 2, 3, 3, seed=15), _randn(5, 7, seed=16)
    torch.testing.assert_close(L.similarity_preserving(s, t), ref_sp(s, t), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(L.similarity_preserving(s, t, reduction="sum"), 25 * ref_sp(s, t))
    torch.testing.assert_close(L.pkt(s, t), ref_pkt(s, t), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(L.pkt(s, t, reduction="sum"), 25 * ref_pkt(s, t), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(L.rkd_distance(s, t), ref_rkd_distance(s, t), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(L.rkd_angle(s, t), ref_rkd_angle(s, t), atol=1e-6, rtol=1e-6)
    expected = 25 * ref_rkd_distance(s, t) + 50 * ref_rkd_angle(s, t)
    torch.testing.assert_close(L.rkd(s, t), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(L.rkd(s, t, distance_weight=1.0, angle_weight=0.0), ref_rkd_distance(s, t))


def _crd_inputs(n: int = 4, k: int = 6, d: int = 5, seed: int = 20) -> dict[str, Tensor]:
    return {
        "student_embed": _unit(n, d, seed=seed),
        "teacher_embed": _unit(n, d, seed=seed + 1),
        "student_negatives": _unit(n, k, d, seed=seed + 2),
        "teacher_negatives": _unit(n, k, d, seed=seed + 3),
        "student_positive": _unit(n, d, seed=seed + 4),
        "teacher_positive": _unit(n, d, seed=seed + 5),
    }


def test_crd_nce_reference() -> None:
    x, n_data, tau, z_s, z_t = _crd_inputs(), 50, 0.07, 40.0, 70.0
    got = L.crd_nce(**x, n_data=n_data, student_normalizer=z_s, teacher_normalizer=z_t, reduction="none")
    expected = ref_crd_term(
        x["student_embed"], x["teacher_positive"], x["teacher_negatives"], z_s, n_data, tau
    ) + ref_crd_term(x["teacher_embed"], x["student_positive"], x["student_negatives"], z_t, n_data, tau)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # without bank positives, the other model's current embedding is the positive
    no_pos = {key: v for key, v in x.items() if not key.endswith("positive")}
    got = L.crd_nce(**no_pos, n_data=n_data, student_normalizer=z_s, teacher_normalizer=z_t)
    expected = ref_crd_term(
        x["student_embed"], x["teacher_embed"], x["teacher_negatives"], z_s, n_data, tau
    ) + ref_crd_term(x["teacher_embed"], x["student_embed"], x["student_negatives"], z_t, n_data, tau)
    torch.testing.assert_close(got, expected.mean(), atol=1e-6, rtol=1e-6)
    # Z as the official code estimates it: n_data * mean exp(score / T) over the (N, K + 1) scores
    z_student, z_teacher = L.crd_normalizers(**x, n_data=n_data)
    bank = torch.cat([x["teacher_positive"][:, None], x["teacher_negatives"]], 1)
    scores = (bank * x["student_embed"][:, None]).sum(-1) / tau
    torch.testing.assert_close(z_student, n_data * torch.exp(scores).mean())
    assert z_teacher > 0 and not z_student.requires_grad


def test_crd_memory_update_is_pure() -> None:
    bank, embed, index = _unit(10, 4, seed=30), _unit(3, 4, seed=31), torch.tensor([7, 2, 5])
    before = bank.clone()
    rows = L.crd_memory_update(bank, index, embed, 0.5)
    torch.testing.assert_close(bank, before)
    torch.testing.assert_close(rows, F.normalize(0.5 * bank[index] + 0.5 * embed, dim=1))
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_token_contextual_reference() -> None:
    s, t = _randn(3, 5, 4, seed=40), _randn(3, 5, 6, seed=41)
    expected = torch.stack([ref_contextual(s[b], t[b]) for b in range(3)])
    torch.testing.assert_close(L.token_contextual(s, t, reduction="none"), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(L.token_contextual(s, t), expected.mean(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("k", "lw", "gw"), [(3, 1.0, 1.0), (20, 1.0, 0.0), (2, 0.0, 1.0), (4, 0.5, 2.0)])
def test_token_relation_graph_reference(k: int, lw: float, gw: float) -> None:
    s, t = _randn(2, 4, 5, seed=50), _randn(2, 4, 5, seed=51)
    got = L.token_relation_graph(s, t, k=k, sigma=2.0, temperature=0.5, local_weight=lw, global_weight=gw)
    expected = ref_trg(s.reshape(8, 5), t.reshape(8, 5), min(k, 7), 2.0, 0.5, lw, gw)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    total = L.token_relation_graph(
        s, t, k=k, sigma=2.0, temperature=0.5, local_weight=lw, global_weight=gw, reduction="sum"
    )
    torch.testing.assert_close(total, 8 * expected, atol=1e-6, rtol=1e-6)


def test_token_relation_graph_local_term_allows_different_widths() -> None:
    s, t = _randn(2, 4, 3, seed=52), _randn(2, 4, 6, seed=53)
    got = L.token_relation_graph(s, t, k=3, global_weight=0.0)
    torch.testing.assert_close(got, ref_trg(s.reshape(8, 3), t.reshape(8, 6), 3, 1.0, 0.1, 1.0, 0.0))
    with pytest.raises(ValueError, match="global term needs equal token widths"):
        L.token_relation_graph(s, t)


# ------------------------------------------------------------------ (b) against torchdistill


@pytest.fixture(scope="module")
def td():
    return pytest.importorskip("torchdistill.losses.mid_level")


def _io(x: Tensor, path: str = "layer", key: str = "output") -> dict:
    return {path: {key: x}}


def _at_pairs() -> dict:
    pair = {"student": {"io": "output", "path": "layer"}, "teacher": {"io": "output", "path": "layer"}}
    return {"pair1": pair | {"weight": 1}}


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_attention_transfer_vs_torchdistill(td, mode: str) -> None:
    s, t = _randn(6, 4, 5, 5, seed=60), _randn(6, 8, 5, 5, seed=61)
    theirs = td.ATLoss(_at_pairs(), mode=mode)(_io(s), _io(t))
    torch.testing.assert_close(L.attention_transfer(s, t, mode=mode), theirs, atol=1e-9, rtol=1e-9)


def test_similarity_preserving_vs_torchdistill(td) -> None:
    """torchdistill 1.1's SPKDLoss normalises the Gram rows in L1 (``normalize(G, 1)`` sets p = 1); with
    that one difference it is the same loss, and ours is the paper's (L2) one."""
    s, t = _randn(6, 4, 3, 3, seed=62), _randn(6, 20, seed=63)
    for reduction, theirs_reduction, scale in (("mean", "batchmean", 1), ("sum", "sum", 36)):
        theirs = td.SPKDLoss("layer", "layer", theirs_reduction)(_io(s), _io(t))
        torch.testing.assert_close(theirs, scale * ref_sp(s, t, p=1), atol=1e-9, rtol=1e-9)
        ours = L.similarity_preserving(s, t, reduction=reduction)
        torch.testing.assert_close(ours, scale * ref_sp(s, t, p=2), atol=1e-9, rtol=1e-9)


def test_pkt_vs_torchdistill(td) -> None:
    s, t = _randn(7, 10, seed=64), _randn(7, 12, seed=65)
    theirs = td.PKTLoss("fc", "input", "fc", "input")(_io(s, "fc", "input"), _io(t, "fc", "input"))
    torch.testing.assert_close(L.pkt(s, t), theirs, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rkd_vs_torchdistill(td, reduction: str) -> None:
    s, t = _randn(6, 3, 2, 2, seed=66), _randn(6, 9, seed=67)
    for dw, aw in ((25.0, 50.0), (1.0, 0.0), (0.0, 1.0), (1.0, 2.0)):
        theirs = td.RKDLoss("layer", "layer", dw, aw, reduction)(_io(s), _io(t))
        ours = L.rkd(s, t, distance_weight=dw, angle_weight=aw, reduction=reduction)
        torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-9)


def test_fsp_vs_torchdistill(td) -> None:
    s1, s2 = _randn(5, 4, 8, 8, seed=68), _randn(5, 6, 4, 4, seed=69)
    t1, t2 = _randn(5, 4, 6, 6, seed=70), _randn(5, 6, 6, 6, seed=71)
    ends = {
        f"{who}_{which}": {"io": which, "path": "x"}
        for who in ("student", "teacher")
        for which in ("first", "second")
    }
    loss = td.FSPLoss({"pair1": ends | {"weight": 1}})
    theirs = loss({"x": {"first": s1, "second": s2}}, {"x": {"first": t1, "second": t2}})
    torch.testing.assert_close(L.fsp(s1, s2, t1, t2, distance="column_norm"), theirs, atol=1e-9, rtol=1e-9)


def test_crd_vs_torchdistill(td) -> None:
    """CRDLoss driven deterministically: its memory banks are read before the step, the negatives are given
    through ``contrast_idx`` (positive index first), and its Z are estimated from this (first) batch."""
    n, k, d, n_data = 5, 7, 6, 16  # a power-of-two dataset size keeps its alias table exact
    loss = td.CRDLoss("s_norm", "s_empty", "t_norm", d, n_data, k, n_data, temperature=0.07).double()
    s, t = _unit(n, d, seed=72), _unit(n, d, seed=73)
    pos = torch.tensor([3, 0, 9, 12, 5])
    neg = torch.randint(0, n_data, (n, k), generator=torch.Generator().manual_seed(74))
    bank_s, bank_t = loss.memory_v1.clone(), loss.memory_v2.clone()
    supp = {"pos_idx": pos, "contrast_idx": torch.cat([pos[:, None], neg], 1)}
    theirs = loss({"s_norm": {"output": s}, "s_empty": {"input": supp}}, {"t_norm": {"output": t}})
    tau = float(loss.params[1])  # float32 0.07, as CRDLoss stores it
    args = dict(
        student_embed=s,
        teacher_embed=t,
        student_negatives=bank_s[neg],
        teacher_negatives=bank_t[neg],
        student_positive=bank_s[pos],
        teacher_positive=bank_t[pos],
        n_data=n_data,
        temperature=tau,
    )
    z_s, z_t = L.crd_normalizers(**args)
    torch.testing.assert_close(torch.stack([z_s, z_t]), loss.params[2:4], atol=1e-9, rtol=1e-12)
    ours = L.crd_nce(**args, student_normalizer=z_s, teacher_normalizer=z_t)
    torch.testing.assert_close(ours, theirs.reshape(()), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(
        L.crd_memory_update(bank_s, pos, s, 0.5), loss.memory_v1[pos], atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        L.crd_memory_update(bank_t, pos, t, 0.5), loss.memory_v2[pos], atol=1e-12, rtol=0
    )


# ------------------------------------------------------------------ (c) mask == removal, (d) bf16, (e) grads

Case = tuple[Callable[..., Tensor], tuple[Tensor, ...], int, tuple[str, ...]]


def _cases() -> dict[str, Case]:
    crd = _crd_inputs(n=6)
    crd_keys = tuple(crd)
    z = {"n_data": 40, "student_normalizer": 30.0, "teacher_normalizer": 50.0}
    all3, batch = ("mean", "sum", "none"), ("mean", "sum")
    return {
        "hint_mse_map": (L.hint_mse, (_randn(6, 3, 4, 4, seed=80), _randn(6, 3, 4, 4, seed=81)), 1, all3),
        "hint_mse_tokens": (L.hint_mse, (_randn(2, 3, 4, seed=82), _randn(2, 3, 4, seed=83)), 2, all3),
        "attention_transfer": (
            L.attention_transfer,
            (_randn(6, 3, 6, 6, seed=84), _randn(6, 5, 3, 3, seed=85)),
            1,
            all3,
        ),
        "fsp": (
            L.fsp,
            tuple(
                _randn(6, c, h, h, seed=86 + i) for i, (c, h) in enumerate([(2, 4), (3, 2), (2, 3), (3, 3)])
            ),
            1,
            all3,
        ),
        "similarity_preserving": (
            L.similarity_preserving,
            (_randn(6, 5, seed=90), _randn(6, 2, 2, seed=91)),
            1,
            batch,
        ),
        "pkt": (L.pkt, (_randn(6, 5, seed=92), _randn(6, 7, seed=93)), 1, batch),
        "rkd": (L.rkd, (_randn(6, 5, seed=94), _randn(6, 7, seed=95)), 1, batch),
        "crd_nce": (
            lambda *xs, **kw: L.crd_nce(**dict(zip(crd_keys, xs, strict=True)), **z, **kw),
            tuple(crd.values()),
            1,
            all3,
        ),
        "token_relation_graph": (
            lambda s, t, **kw: L.token_relation_graph(s, t, k=3, **kw),
            (_randn(2, 4, 5, seed=96), _randn(2, 4, 5, seed=97)),
            2,
            batch,
        ),
    }


CASES = _cases()


def _mask(lead: torch.Size) -> Tensor:
    m = torch.ones(lead.numel(), dtype=torch.bool)
    m[1::3] = False
    return m.reshape(lead)


@pytest.mark.parametrize("name", sorted(CASES))
def test_mask_equals_removal(name: str) -> None:
    fn, inputs, lead_ndim, reductions = CASES[name]
    lead = inputs[0].shape[:lead_ndim]
    mask = _mask(lead)
    removed = tuple(x[mask] for x in inputs)
    for reduction in reductions:
        got = fn(*inputs, mask=mask, reduction=reduction)
        want = fn(*removed, reduction=reduction)
        if reduction == "none":
            assert got.shape == lead
            assert bool((got[~mask] == 0).all())
            torch.testing.assert_close(got[mask], want.reshape(-1), atol=1e-12, rtol=1e-12)
        else:
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    empty = fn(*inputs, mask=torch.zeros(lead, dtype=torch.bool))
    assert float(empty) == 0.0


def test_token_contextual_mask_removes_tokens() -> None:
    s, t = _randn(3, 6, 4, seed=98), _randn(3, 6, 5, seed=99)
    mask = torch.tensor([[1, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    got = L.token_contextual(s, t, mask=mask, reduction="none")
    assert float(got[1]) == 0.0
    for b in (0, 2):
        want = L.token_contextual(s[b : b + 1, mask[b]], t[b : b + 1, mask[b]], reduction="none")
        torch.testing.assert_close(got[b : b + 1], want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(L.token_contextual(s, t, mask=mask), (got[0] + got[2]) / 2)
    torch.testing.assert_close(L.token_contextual(s, t, mask=mask, reduction="sum"), got.sum())


@pytest.mark.parametrize("name", [*sorted(CASES), "token_contextual"])
def test_bf16_inputs_compute_in_float32(name: str) -> None:
    if name == "token_contextual":
        fn, inputs = L.token_contextual, (_randn(2, 4, 3, seed=100), _randn(2, 4, 5, seed=101))
    else:
        fn, inputs = CASES[name][0], CASES[name][1]
    low = tuple(x.to(torch.bfloat16) for x in inputs)
    got = fn(*low)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got))
    torch.testing.assert_close(got, fn(*(x.float() for x in low)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", [*sorted(CASES), "token_contextual"])
def test_gradients_are_finite(name: str) -> None:
    if name == "token_contextual":
        fn, inputs = L.token_contextual, (_randn(2, 4, 3, seed=102), _randn(2, 4, 5, seed=103))
    else:
        fn, inputs = CASES[name][0], CASES[name][1]
    leaves = tuple(x.float().requires_grad_(True) for x in inputs)
    fn(*leaves).backward()
    student_grad = leaves[0].grad
    assert student_grad is not None and bool(torch.isfinite(student_grad).all())
    assert float(student_grad.abs().sum()) > 0
    for leaf in leaves[1:]:
        assert leaf.grad is None or bool(torch.isfinite(leaf.grad).all())


def test_gradients_finite_at_degenerate_inputs() -> None:
    """Equal rows (zero distances, zero difference vectors) and all-zero maps stay finite."""
    x = torch.ones(4, 3, requires_grad=True)
    for loss in (
        L.rkd(x, torch.ones(4, 3)),
        L.pkt(x, torch.ones(4, 3)),
        L.similarity_preserving(x, x.detach()),
    ):
        (g,) = torch.autograd.grad(loss, x)
        assert bool(torch.isfinite(loss)) and bool(torch.isfinite(g).all())
    maps = torch.zeros(2, 3, 4, 4, requires_grad=True)
    (g,) = torch.autograd.grad(L.attention_transfer(maps, torch.zeros(2, 3, 4, 4)), maps)
    assert bool(torch.isfinite(g).all())


def test_rkd_detaches_the_teacher_and_others_do_not() -> None:
    s, t = _randn(5, 4, seed=104).requires_grad_(True), _randn(5, 4, seed=105).requires_grad_(True)
    L.rkd(s, t).backward()
    assert t.grad is None and s.grad is not None
    L.similarity_preserving(s, t).backward()
    assert t.grad is not None


def test_gradcheck_float64() -> None:
    s, t = _randn(4, 2, 3, 3, seed=106).requires_grad_(True), _randn(4, 3, 3, 3, seed=107)
    assert torch.autograd.gradcheck(lambda x: L.attention_transfer(x, t), (s,))
    assert torch.autograd.gradcheck(lambda x: L.similarity_preserving(x, t), (s,))
    assert torch.autograd.gradcheck(lambda x: L.pkt(x, t), (s,))
    assert torch.autograd.gradcheck(lambda x: L.rkd(x, t), (s,))
    tokens_s, tokens_t = _randn(2, 3, 4, seed=108).requires_grad_(True), _randn(2, 3, 4, seed=109)
    assert torch.autograd.gradcheck(lambda x: L.token_contextual(x, tokens_t), (tokens_s,))
    assert torch.autograd.gradcheck(lambda x: L.token_relation_graph(x, tokens_t, k=2), (tokens_s,))


# ------------------------------------------------------------------ errors


def test_shape_and_option_errors() -> None:
    a, b = _randn(4, 3, 5, 5, seed=110), _randn(3, 3, 5, 5, seed=111)
    with pytest.raises(ValueError, match="differ"):
        L.hint_mse(a, a[:, :2])
    with pytest.raises(ValueError, match="leading"):
        L.attention_transfer(a, b)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        L.attention_transfer(a.flatten(1), a.flatten(1))
    with pytest.raises(ValueError, match="leading"):
        L.similarity_preserving(a, b)
    with pytest.raises(ValueError, match="mask shape"):
        L.pkt(a, a, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        L.rkd(a, a, reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        L.token_relation_graph(a[:, :, 0], a[:, :, 0], reduction="none")
    with pytest.raises(ValueError, match="channel counts"):
        L.fsp(a, a, a, a[:, :2])
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        L.token_contextual(a[:, 0], b[:, 0])
    x = _crd_inputs()
    with pytest.raises(ValueError, match=r"\(N, K, D\)"):
        L.crd_nce(
            **(x | {"student_negatives": x["student_negatives"][:, :, :3]}),
            n_data=10,
            student_normalizer=1.0,
            teacher_normalizer=1.0,
        )


# ------------------------------------------------------------------ (f) invariances (hypothesis)

_scales = st.floats(min_value=0.05, max_value=20.0)


@settings(max_examples=20, deadline=None)
@given(c_s=_scales, c_t=_scales, seed=st.integers(0, 1000))
def test_relation_losses_invariant_to_feature_scale(c_s: float, c_t: float, seed: int) -> None:
    s, t = _randn(5, 6, seed=seed), _randn(5, 4, seed=seed + 1)
    for fn in (L.similarity_preserving, L.pkt, L.rkd_distance, L.rkd_angle):
        torch.testing.assert_close(fn(c_s * s, c_t * t), fn(s, t), atol=1e-7, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), shift=st.floats(-5, 5))
def test_rkd_invariant_to_translation_and_row_order(seed: int, shift: float) -> None:
    s, t = _randn(5, 4, seed=seed), _randn(5, 3, seed=seed + 1)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(L.rkd(s + shift, t), L.rkd(s, t), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(L.rkd(s[perm], t[perm]), L.rkd(s, t), atol=1e-7, rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), p=st.sampled_from([1.0, 2.0, 3.0]))
def test_attention_transfer_invariant_to_channel_permutation(seed: int, p: float) -> None:
    s, t = _randn(3, 4, 3, 3, seed=seed), _randn(3, 6, 3, 3, seed=seed + 1)
    g = torch.Generator().manual_seed(seed)
    ps, pt = torch.randperm(4, generator=g), torch.randperm(6, generator=g)
    torch.testing.assert_close(
        L.attention_transfer(s[:, ps], t[:, pt], p=p), L.attention_transfer(s, t, p=p), atol=1e-12, rtol=1e-9
    )


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000))
def test_token_losses_invariant_to_token_order_and_zero_at_equality(seed: int) -> None:
    s, t = _randn(2, 5, 4, seed=seed), _randn(2, 5, 4, seed=seed + 1)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(L.token_contextual(s[:, perm], t[:, perm]), L.token_contextual(s, t))
    local = L.token_relation_graph(s[:, perm], t[:, perm], k=3, global_weight=0.0)
    torch.testing.assert_close(local, L.token_relation_graph(s, t, k=3, global_weight=0.0))
    assert float(L.token_contextual(t, t)) == 0.0
    assert abs(float(L.token_relation_graph(t, t, global_weight=0.0))) < 1e-12
    assert float(L.hint_mse(t, t)) == 0.0
