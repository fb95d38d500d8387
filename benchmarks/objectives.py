"""Forward + backward time of every logit objective at (rows, vocab) = (8192, 32000), float32 inputs, next
to a naive float32 reference written the way the papers' code writes it (and public peers where installed:
TRL's generalized_jsd_loss, torchdistill's KDLoss). Prints a markdown table and writes it to
benchmarks/results/objectives.md.

    PYTHONPATH=src python benchmarks/objectives.py [--rows 8192] [--vocab 32000] [--repeats 2]

A subset of the objectives (--only) or other sizes than the defaults is a partial run: it writes
benchmarks/results/objectives_partial.md, never over the full run's objectives.md.

Sinkhorn KD builds an n x n cost over the batch from n x n x V work, so it runs at --sinkhorn-rows (1024)
rows. Timings are wall-clock seconds, the minimum over repeats (ours, naive and peer interleaved run by
run) after one warm-up at a small size; the ratio column is ours / naive (below 1 = faster).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import distill.losses as L  # noqa: E402
from _results import out_help, output_file  # noqa: E402  (the results-file rule)

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------ naive references (papers' code style)
def naive_forward_kl(s, t, y):
    return F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")


def naive_reverse_kl(s, t, y):
    return F.kl_div(F.log_softmax(t, -1), F.softmax(s, -1), reduction="batchmean")


def naive_total_variation(s, t, y):
    return 0.5 * (F.softmax(t, -1) - F.softmax(s, -1)).abs().sum(-1).mean()


def naive_gjsd(s, t, y, beta=0.5):
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    b = torch.tensor(beta)
    lm = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), 0)
    kt = F.kl_div(lm, lt, reduction="none", log_target=True)
    ks = F.kl_div(lm, ls, reduction="none", log_target=True)
    return (beta * kt + (1 - beta) * ks).sum() / s.shape[0]


def naive_skew_forward_kl(s, t, y, alpha=0.1):
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    mix = torch.log(alpha * p + (1 - alpha) * q)
    return (p * (torch.log(p) - mix)).sum(-1).mean()


def naive_skew_reverse_kl(s, t, y, alpha=0.1):
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    mix = torch.log(alpha * q + (1 - alpha) * p)
    return (q * (F.log_softmax(s, -1) - mix)).sum(-1).mean()


def naive_hinton_kd(s, t, y, T=4.0):
    return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="none").sum(1).mean() * T * T


def naive_dkd(s, t, y, alpha=1.0, beta=8.0, T=4.0):
    gt = torch.zeros_like(s).scatter_(1, y[:, None], 1).bool()
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * T * T / s.shape[0]
    nckd = F.kl_div(F.log_softmax(s / T - 1000.0 * gt, 1), F.softmax(t / T - 1000.0 * gt, 1), reduction="sum")
    return alpha * tckd + beta * nckd * T * T / s.shape[0]


def naive_dist_kd(s, t, y):
    def pearson(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)

    ys, yt = s.softmax(1), t.softmax(1)
    return (1 - pearson(ys, yt).mean()) + (1 - pearson(ys.T, yt.T).mean())


def naive_kl_mixing(s, t, y, w=0.5):
    return w * naive_forward_kl(s, t, y) + (1 - w) * naive_reverse_kl(s, t, y)


def naive_taid(s, t, y, tt=0.4):
    target = F.softmax((1 - tt) * s.detach() + tt * t, -1)
    return -(target * F.log_softmax(s, -1)).sum(-1).mean()


def naive_bdkd(s, t, y):
    def entropy(z):
        p = F.softmax(z, -1)
        return -(p * torch.log(p + 1e-9)).sum(-1)

    hs, ht = entropy(s), entropy(t)
    ws, wt = torch.where(hs > ht, 3.0, 1.0), torch.where(ht > hs, 3.0, 1.0)
    fkl = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="none").sum(-1)
    rkl = F.kl_div(F.log_softmax(t, -1), F.softmax(s, -1), reduction="none").sum(-1)
    return (wt * fkl + ws * rkl).mean()


def naive_pld(s, t, y):
    key = t.detach().clone().scatter_(1, y[:, None], float("inf"))
    order = key.argsort(1, descending=True)
    alpha = F.softmax(t, 1).gather(1, order)
    ss = s.gather(1, order)
    return (alpha * (torch.logcumsumexp(ss.flip(1), 1).flip(1) - ss)).sum(1).mean()


def naive_sinkhorn(s, t, y, T=2.0, eps=0.1, iters=20):
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    w = torch.cdist(ps, pt, p=1)
    k = torch.exp(-w / eps)
    for _ in range(iters):
        k = k / k.sum(1, keepdim=True)
        k = k / k.sum(0, keepdim=True)
    return (k * w).sum()


def _trl_gjsd() -> Fn | None:
    try:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    except Exception:  # noqa: BLE001 - optional peer
        return None
    return lambda s, t, y: GKDTrainer.generalized_jsd_loss(s, t, beta=0.5)


def _torchdistill_kd() -> Fn | None:
    try:
        from torchdistill.losses.mid_level import KDLoss
    except Exception:  # noqa: BLE001 - optional peer
        return None
    loss = KDLoss("fc", "output", "fc", "output", temperature=4.0, alpha=0.0)
    return lambda s, t, y: 16.0 * loss({"fc": {"output": s}}, {"fc": {"output": t}})


CASES: list[tuple[str, Fn, Fn | None, str]] = [
    ("forward_kl", lambda s, t, y: L.forward_kl(s, t), naive_forward_kl, ""),
    ("reverse_kl", lambda s, t, y: L.reverse_kl(s, t), naive_reverse_kl, ""),
    ("total_variation", lambda s, t, y: L.total_variation(s, t), naive_total_variation, ""),
    ("generalized_jsd", lambda s, t, y: L.generalized_jsd(s, t, beta=0.5), naive_gjsd, "trl"),
    ("skew_forward_kl", lambda s, t, y: L.skew_forward_kl(s, t), naive_skew_forward_kl, ""),
    ("skew_reverse_kl", lambda s, t, y: L.skew_reverse_kl(s, t), naive_skew_reverse_kl, ""),
    ("hinton_kd", lambda s, t, y: L.hinton_kd(s, t), naive_hinton_kd, "torchdistill"),
    ("hinton_kd (standardize)", lambda s, t, y: L.hinton_kd(s, t, standardize=True), None, ""),
    ("dkd", lambda s, t, y: L.dkd(s, t, labels=y), naive_dkd, ""),
    ("dist_kd", lambda s, t, y: L.dist_kd(s, t), naive_dist_kd, ""),
    ("kl_mixing", lambda s, t, y: L.kl_mixing(s, t), naive_kl_mixing, ""),
    ("taid", lambda s, t, y: L.taid(s, t), naive_taid, ""),
    ("bdkd", lambda s, t, y: L.bdkd(s, t), naive_bdkd, ""),
    ("adakd (reverse_kl, ratio 0.5)", lambda s, t, y: L.adakd(s, t, token_ratio=0.5), None, ""),
    ("token_selective_kd", lambda s, t, y: L.token_selective_kd(s, t), None, ""),
    ("swing_kd", lambda s, t, y: L.swing_kd(s, t), None, ""),
    ("pld", lambda s, t, y: L.pld(s, t, labels=y), naive_pld, ""),
    ("dbild", lambda s, t, y: L.dbild(s, t), None, ""),
    ("sinkhorn_kd", lambda s, t, y: L.sinkhorn_kd(s, t), naive_sinkhorn, ""),
]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def time_case(fns: list[Fn | None], rows: int, vocab: int, repeats: int, seed: int = 0) -> list[float | None]:
    """Best wall-clock forward + backward time of each function, the functions interleaved run by run so
    that load from other processes on the machine hits them alike."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=g) * 2
    t = torch.randn(rows, vocab, generator=g) * 2
    y = torch.randint(0, vocab, (rows,), generator=g)
    best: list[float | None] = [None if fn is None else float("inf") for fn in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if fn is None:
                continue
            leaf = s.clone().requires_grad_(True)
            start = time.perf_counter()
            value = fn(leaf, t, y)
            value.backward()
            elapsed = time.perf_counter() - start
            assert torch.isfinite(value), "non-finite benchmark value"
            best[i] = min(best[i], elapsed)  # type: ignore[type-var]
            del leaf, value
            gc.collect()
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--sinkhorn-rows", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="names to run (default: all)")
    parser.add_argument("--out", type=Path, default=None, help=out_help("objectives"))
    args = parser.parse_args(argv)
    sizes = ("rows", "vocab", "sinkhorn_rows")
    partial = bool(args.only) or any(getattr(args, k) != parser.get_default(k) for k in sizes)
    args.out = output_file(parser, "objectives", args.out, quick=False, partial=partial)

    peers = {"trl": _trl_gjsd(), "torchdistill": _torchdistill_kd()}
    lines = [
        f"# Logit objectives: forward + backward time at ({args.rows}, {args.vocab}), float32",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}. Minimum of {args.repeats} interleaved runs after a warm-up; seconds. "
        f"Sinkhorn KD at ({args.sinkhorn_rows}, {args.vocab}) (its batch cost is n x n x V).",
        "",
        "| objective | ours (s) | naive (s) | ours / naive | peer | peer (s) |",
        "|---|---:|---:|---:|---|---:|",
    ]
    print("\n".join(lines), flush=True)
    for name, ours, naive, peer_name in CASES:
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        rows = args.sinkhorn_rows if name == "sinkhorn_kd" else args.rows
        peer = peers.get(peer_name) if peer_name else None
        time_case([ours, naive, peer], 64, 512, 1)  # warm-up
        t_ours, t_naive, t_peer = time_case([ours, naive, peer], rows, args.vocab, args.repeats)
        row = (
            f"| {name} | {t_ours:.2f} | {'' if t_naive is None else f'{t_naive:.2f}'} | "
            f"{'' if t_naive is None else f'{t_ours / t_naive:.2f}'} | {peer_name if peer else ''} | "
            f"{'' if t_peer is None else f'{t_peer:.2f}'} |"
        )
        lines.append(row)
        print(row, flush=True)
        _write(args.out, lines + ["", "(partial: the run is still going)", ""])
    lines += ["", f"Peak resident memory of the run: {_peak_rss_gb():.1f} GB.", ""]
    _write(args.out, lines)
    print(f"\nwritten to {args.out}")


def _write(path: Path, lines: list[str]) -> None:
    """Write through a temporary name and rename, so a reader never sees half a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)


if __name__ == "__main__":
    main()
