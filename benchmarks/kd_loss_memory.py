"""Memory and time of a large-vocabulary KD loss (generalised JSD, beta = 0.5), forward + backward.

Implementations: `distill.losses.fused_linear_divergence` (ours), our dense reference (full logits, then
`generalized_jsd`), TRL's dense `GKDTrainer.generalized_jsd_loss`, TRL's `_chunked_divergence_loss` and
Liger-Kernel's `LigerFusedLinearJSDLoss` (torch path: ``compiled=False``, ``weight_hard_loss=0``,
``weight_soft_loss=1`` so that it returns the JSD itself). All take float32 student / teacher hidden states
(N, H) and output layers (V, H), average over the N tokens, and differentiate the student's hidden states and
weight.

Each (implementation, size) runs in a fresh process. The process allocates the inputs and, once, buffers the
size of their gradients, and reads its peak RSS: the baseline. It then runs the loss (warm-up + timed
repeats); "peak over baseline" is its final peak RSS minus that baseline, i.e. the memory the loss needs on
top of its inputs and their gradients. Seconds are the median forward + backward time.

    python benchmarks/kd_loss_memory.py            # N=2048,V=32768 and N=4096,V=65536 (H=512)
    python benchmarks/kd_loss_memory.py --big      # also N=8192, V=131072, H=1024: ours only
    python benchmarks/kd_loss_memory.py --quick    # a small size, for a smoke test

The full run is `--big` with every implementation: it writes benchmarks/results/kd_loss_memory.md. --quick
writes kd_loss_memory_quick.md; a run without --big or with a subset of --impls kd_loss_memory_partial.md,
never over the full run's file.

A dense implementation is not started when the memory it is predicted to need (bytes per logit measured at
the smaller size, times N V) would not fit in the memory available; the table then says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import command_line, out_help, output_file  # noqa: E402  (the results-file rule)

IMPLS = ("ours", "dense_ref", "trl_dense", "trl_chunked", "liger", "matmul_floor")
PEERS = ("trl_dense", "trl_chunked", "liger")
DENSE = ("dense_ref", "trl_dense")
LABELS = {
    "ours": "ours: `fused_linear_divergence`",
    "dense_ref": "dense reference (ours, full logits)",
    "trl_dense": "TRL `generalized_jsd_loss` (dense)",
    "trl_chunked": "TRL `_chunked_divergence_loss`",
    "liger": "Liger `LigerFusedLinearJSDLoss` (torch)",
    "matmul_floor": "matmul floor (the 4 N H V multiply-adds alone)",
}
SIZES = ((2048, 32768, 512), (4096, 65536, 512))
BIG = (8192, 131072, 1024)
BETA = 0.5
NOT_INSTALLED = 3  # child exit code


# ------------------------------------------------------------------------------------------- child
def _loss_fn(impl: str, hs, ws, ht, wt):  # noqa: ANN001, ANN202 (tensors; torch is imported in the child)
    """A closure computing the scalar loss, its imports done before the baseline is read."""
    import torch

    n = hs.shape[0]
    if impl == "ours":
        from distill.losses import fused_linear_divergence

        return lambda: fused_linear_divergence(hs, ws, ht, wt, divergence="jsd", beta=BETA)
    if impl == "dense_ref":
        from distill.losses.fused_linear import linear_divergence_reference

        return lambda: linear_divergence_reference(hs, ws, ht, wt, divergence="jsd", beta=BETA)
    if impl == "trl_dense":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.gkd.gkd_trainer import GKDTrainer
        labels = torch.zeros(1, n, dtype=torch.long)  # no -100: every token counts, mean over tokens

        def trl_dense():
            student = (hs @ ws.t())[None]
            with torch.no_grad():
                teacher = (ht @ wt.t())[None]
            return GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=BETA)

        return trl_dense
    if impl == "trl_chunked":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        mask = torch.ones(1, n)
        return lambda: _chunked_divergence_loss(hs[None], ht[None], ws, wt, mask, BETA)[0]
    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, temperature=1.0, compiled=False
        )
        labels = torch.zeros(n, dtype=torch.long)
        return lambda: loss(hs, ws, ht, wt, labels)
    if impl == "matmul_floor":
        return _matmul_floor(hs, ws, ht, wt)
    raise ValueError(impl)


def _matmul_floor(hs, ws, ht, wt):  # noqa: ANN001, ANN202
    """The four products any exact fused loss makes (both logits, d hidden, d weight), by chunks of 512
    tokens, with no softmax or divergence: a lower bound of the time. Returns a scalar with no gradient
    path; the gradients are written directly."""
    import torch

    def floor():
        rows = 512
        grad_w = torch.zeros_like(ws)
        grad_h = torch.empty_like(hs)
        s = torch.empty(ws.shape[0], rows)
        t = torch.empty(ws.shape[0], rows)
        with torch.no_grad():
            for a in range(0, hs.shape[0], rows):
                h, n = hs[a : a + rows], min(rows, hs.shape[0] - a)
                torch.mm(ws, h.t(), out=s[:, :n])
                torch.mm(wt, ht[a : a + rows].t(), out=t[:, :n])
                torch.mm(s[:, :n].t(), ws, out=grad_h[a : a + rows])
                grad_w.addmm_(s[:, :n], h)
        hs.grad, ws.grad = grad_h, grad_w
        return torch.zeros((), requires_grad=True)

    return floor


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cap_address_space() -> None:
    """Fail an allocation (an error in this process) rather than push the shared machine out of memory."""
    vm = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            vm = int(line.split()[1]) * 1024
    limit = vm + int((mem_available_mb() - 2048) * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_one(impl: str, n: int, vocab: int, hidden: int, warmup: int, repeats: int) -> dict:
    import torch

    _cap_address_space()

    g = torch.Generator().manual_seed(0)
    scale = 2.0 / hidden**0.5  # logits with a standard deviation of about 2
    hs = torch.randn(n, hidden, generator=g).requires_grad_()
    ws = (torch.randn(vocab, hidden, generator=g) * scale).requires_grad_()
    ht = torch.randn(n, hidden, generator=g)
    wt = torch.randn(vocab, hidden, generator=g) * scale
    try:
        fn = _loss_fn(impl, hs, ws, ht, wt)
    except ImportError as exc:
        print(json.dumps({"error": f"not installed ({exc.name})"}))
        sys.exit(NOT_INSTALLED)
    # the baseline: inputs plus buffers the size of their gradients
    grads = [torch.ones_like(hs), torch.ones_like(ws)]
    baseline = _maxrss_mb()
    del grads
    seconds, value = [], float("nan")
    for i in range(warmup + repeats):
        hs.grad = ws.grad = None
        start = time.perf_counter()
        loss = fn()
        loss.backward()
        elapsed = time.perf_counter() - start
        value = float(loss.detach())
        del loss
        if i >= warmup:
            seconds.append(elapsed)
    return {
        "value": value,
        "baseline_mb": baseline,
        "peak_mb": _maxrss_mb(),
        "seconds": statistics.median(seconds),
        "runs": len(seconds),
        "grad_norm": float(ws.grad.norm()),
    }


# ------------------------------------------------------------------------------------------- parent
def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(impl: str, size: tuple[int, int, int], warmup: int, repeats: int, timeout: int) -> dict:
    n, vocab, hidden = size
    cmd = [
        sys.executable,
        __file__,
        "--one",
        impl,
        str(n),
        str(vocab),
        str(hidden),
        str(warmup),
        str(repeats),
    ]
    avail = mem_available_mb()  # what the child's address-space cap is made from
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines:
        result = json.loads(lines[-1])
        if "error" in result or proc.returncode == 0:
            return result
    if "can't allocate memory" in proc.stderr:
        cap = (avail - 2048) / 1024
        return {"error": f"out of memory: stopped at this benchmark's cap of {cap:.1f} GB (available - 2 GB)"}
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
    return {"error": f"failed (exit {proc.returncode}): {tail}"}


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def table_rows(size: tuple[int, int, int], results: dict[str, dict]) -> tuple[list[list[str]], dict]:
    """Markdown rows for one size, and the goal checks."""
    ok = {k: r for k, r in results.items() if "error" not in r and "skipped" not in r}
    over = {k: r["peak_mb"] - r["baseline_mb"] for k, r in ok.items()}
    peers_run = [p for p in PEERS if p in ok]
    fastest = min(peers_run, key=lambda p: ok[p]["seconds"]) if peers_run else None
    n, vocab, hidden = size
    floor_gflop = 8 * n * hidden * vocab / 1e9  # 4 N H V multiply-adds
    rows = []
    for impl in IMPLS:
        r = results.get(impl)
        if r is None:
            continue
        if impl not in ok:
            rows.append([LABELS[impl], "", "", "", "", "", "", r.get("error") or r.get("skipped", "")])
            continue
        mem_ratio = fmt(over[impl] / over["liger"], 3) if "liger" in ok and over["liger"] > 0 else ""
        time_ratio = fmt(ok[impl]["seconds"] / ok[fastest]["seconds"]) if fastest else ""
        rows.append(
            [
                LABELS[impl],
                "-" if impl == "matmul_floor" else f"{ok[impl]['value']:.6f}",
                f"{over[impl]:.0f}",
                f"{ok[impl]['peak_mb']:.0f}",
                fmt(ok[impl]["seconds"]),
                mem_ratio,
                time_ratio,
                f"{floor_gflop / ok[impl]['seconds']:.0f} GFLOP/s at 4NHV",
            ]
        )
    checks = {"fastest_peer": fastest}
    if "ours" in ok:
        if "liger" in ok:
            checks["mem_ratio_vs_liger"] = over["ours"] / over["liger"]
        if fastest:
            checks["time_ratio_vs_fastest_peer"] = ok["ours"]["seconds"] / ok[fastest]["seconds"]
        if "matmul_floor" in ok:
            checks["time_ratio_vs_floor"] = ok["ours"]["seconds"] / ok["matmul_floor"]["seconds"]
    return rows, checks


HEADERS = [
    "implementation",
    "loss",
    "peak over baseline (MB)",
    "peak RSS (MB)",
    "seconds (fwd+bwd)",
    "memory / Liger",
    "time / fastest peer",
    "notes",
]


def machine() -> str:
    import torch

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    total = 0.0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) / 2**20
    versions = [f"torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    for name in ("trl", "liger_kernel"):
        try:
            from importlib.metadata import version

            versions.append(f"{name} {version(name.replace('_', '-'))}")
        except Exception:  # noqa: BLE001 - reported as missing
            versions.append(f"{name} not installed")
    return (
        f"{cpu}, {os.cpu_count()} cores, {total:.0f} GB RAM, Python {platform.python_version()}; "
        + ", ".join(versions)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--one", nargs=6, metavar=("IMPL", "N", "V", "H", "WARMUP", "REPEATS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--big", action="store_true", help="also N=8192, V=131072, H=1024 (ours only)")
    parser.add_argument("--quick", action="store_true", help="one small size (N=512, V=8192, H=256)")
    parser.add_argument(
        "--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS)
    )
    parser.add_argument("--out", type=Path, default=None, help=out_help("kd_loss_memory"))
    parser.add_argument("--timeout", type=int, default=900, help="seconds per measurement")
    args = parser.parse_args(argv)
    if args.one:
        impl, n, vocab, hidden, warmup, repeats = args.one
        print(json.dumps(run_one(impl, int(n), int(vocab), int(hidden), int(warmup), int(repeats))))
        return 0

    from rich.console import Console
    from rich.table import Table

    from distill.tables import markdown_table

    console = Console()
    impls = [i for i in args.impls.split(",") if i]
    partial = not args.big or set(impls) != set(IMPLS)
    out_file = output_file(parser, "kd_loss_memory", args.out, quick=args.quick, partial=partial)
    sizes = [(512, 8192, 256)] if args.quick else list(SIZES)
    command = command_line("kd_loss_memory", argv)
    load_before = load_average()
    started = time.time()
    sections = []
    checks_all = {}
    bytes_per_logit: dict[str, float] = {}  # dense implementations, from the smaller size
    for index, size in enumerate(sizes):
        n, vocab, hidden = size
        warmup, repeats = (1, 2) if index == 0 else (0, 1)
        results: dict[str, dict] = {}
        for impl in impls:
            if impl in DENSE and impl in bytes_per_logit:
                need = bytes_per_logit[impl] * n * vocab / 2**20
                avail = mem_available_mb()
                if need > avail - 3072:
                    results[impl] = {
                        "skipped": f"not run: predicted {need / 1024:.1f} GB over baseline, "
                        f"{avail / 1024:.1f} GB available (shared machine)"
                    }
                    console.print(f"{impl} {size}: {results[impl]['skipped']}")
                    continue
            console.print(f"[bold]{impl}[/] N={n} V={vocab} H={hidden} (load {load_average()})")
            results[impl] = measure(impl, size, warmup, repeats, args.timeout)
            r = results[impl]
            if "error" not in r and impl in DENSE:
                bytes_per_logit[impl] = (r["peak_mb"] - r["baseline_mb"]) * 2**20 / (n * vocab)
            elif "error" in r and impl in bytes_per_logit:
                r["error"] += (
                    f"; predicted need {bytes_per_logit[impl] * n * vocab / 2**30:.1f} GB over baseline"
                )
            console.print(f"  {r}")
        rows, checks = table_rows(size, results)
        checks_all[size] = checks
        table = Table(title=f"N={n}, V={vocab}, H={hidden}")
        for h in HEADERS:
            table.add_column(h)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        sections.append((size, rows, checks))
    big_section = ""
    if args.big:
        n, vocab, hidden = BIG
        console.print(f"[bold]ours[/] N={n} V={vocab} H={hidden} (load {load_average()})")
        r = measure("ours", BIG, 0, 1, args.timeout)
        console.print(f"  {r}")
        logits_gb = n * vocab * 4 / 2**30
        ref = bytes_per_logit.get("dense_ref")
        dense_need = (
            f"{ref * n * vocab / 2**30:.0f} GB (measured {ref:.1f} bytes per logit at the smaller sizes)"
            if ref
            else f"at least {3 * logits_gb:.0f} GB (three float32 N x V tensors: logits, log-probs, gradient)"
        )
        if "error" in r:
            ours = f"failed: {r['error']}"
        else:
            ours = (
                f"ran to completion: loss {r['value']:.6f}, {r['seconds']:.1f} s "
                f"({8 * n * hidden * vocab / 1e9 / r['seconds']:.0f} GFLOP/s at 4NHV), peak RSS "
                f"{r['peak_mb']:.0f} MB ({r['peak_mb'] - r['baseline_mb']:.0f} MB over the "
                f"{r['baseline_mb']:.0f} MB baseline of inputs and gradients)"
            )
        big_section = (
            f"\n## N={n}, V={vocab}, H={hidden} (`--big`)\n\n"
            f"- ours: {ours}.\n"
            f"- dense reference: not run. One float32 N x V logits tensor is {logits_gb:.0f} GB; the dense "
            f"path would need about {dense_need} on top of its inputs, more than this machine's memory.\n"
        )
    load_after = load_average()
    minutes = (time.time() - started) / 60
    out = [
        "# KD loss memory and time: generalised JSD (beta = 0.5), forward + backward, float32, CPU\n",
        f"Command: `{command.strip()}` ({minutes:.1f} min). Machine: {machine()}. "
        f"Load average (1, 5, 15 min) before: {load_before}, after: {load_after} (the machine is shared "
        "with other jobs, so seconds are noisy; all rows ran in the same session, one after another).\n",
        "Each cell is a fresh process. *Peak over baseline*: peak RSS minus the RSS after allocating the "
        "inputs and buffers the size of their gradients, i.e. what the loss needs on top of them. "
        "*Memory / Liger*: that over Liger's. *Time / fastest peer*: seconds over the fastest of TRL dense, "
        "TRL chunked and Liger. *Matmul floor*: only the four products every exact fused loss makes (both "
        "logits, d hidden, d weight; 512-token chunks), no softmax: the time to aim at, not a loss. First "
        "size: median of 2 runs after a warm-up; second: 1 run.\n",
        "Same quantity everywhere: the mean over tokens of JSD_0.5(teacher, student) at temperature 1 with "
        "mixture M = 0.5 P + 0.5 Q. Liger returns `weight_soft_loss * JSD` (set to 1; its default 0.5 would "
        "halve it) and skips its cross-entropy at `weight_hard_loss=0`; TRL dense is given labels with no "
        "-100 so it averages over tokens; TRL chunked also computes the student entropy (returned, not "
        "differentiated). The loss column agrees to float32 rounding.\n",
    ]
    for (n, vocab, hidden), rows, checks in sections:
        out.append(f"\n## N={n}, V={vocab}, H={hidden}\n\n" + markdown_table(HEADERS, rows))
        notes = []
        if "mem_ratio_vs_liger" in checks:
            notes.append(f"memory / Liger = {checks['mem_ratio_vs_liger']:.3f} (goal <= 0.2)")
        if "time_ratio_vs_fastest_peer" in checks:
            ratio = checks["time_ratio_vs_fastest_peer"]
            notes.append(f"time / fastest peer ({checks['fastest_peer']}) = {ratio:.2f} (goal <= 1.0)")
        if "time_ratio_vs_floor" in checks:
            notes.append(f"time / matmul floor = {checks['time_ratio_vs_floor']:.2f}")
        if notes:
            out.append("\nGoals: " + "; ".join(notes) + ".\n")
    out.append(big_section)
    text = "\n".join(out)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(text)
    console.print(f"wrote {out_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
