"""token_logprobs' kernels side by side: plain full logits vs chunked (checkpointed) vs fused (no recompute).

    .venv/bin/python benchmarks/logprobs.py                  # V = 49,152, H = 576 (SmolLM2), N = B x T
    .venv/bin/python benchmarks/logprobs.py --quick          # smoke: N = 2 x 128
    .venv/bin/python benchmarks/logprobs.py --allow-shared   # write results although the machine was shared

Every variant runs forward AND backward of ``sum(c_lp * logprobs) + sum(c_ent * entropy)`` to ``hidden`` and
``weight``, with fixed random per-token weights c (a loss's upstream gradients are per token, not one
scalar). Time, values and gradients are compared side by side in one process (A B C A B C ...). Peak memory
is measured in a fresh subprocess per variant: the increase of the peak RSS (VmHWM) over one forward+backward
(on CUDA ``torch.cuda.max_memory_allocated``). The weight is SmolLM2-135M's tied embedding (random if the
bundled model is not cached); hidden rows are N(0, 1) scaled by its final RMSNorm weight; targets uniform ids.

- plain: full float32 (N, V) logits, log_softmax, gather, -Σ p log p (the reference; ~5 (N, V) float32 blocks
  at its peak).
- chunked: ``token_logprobs(kernel="chunked", recompute=True)``: each chunk's logits recomputed in the backward.
- fused: ``token_logprobs(kernel="fused")``: one (N, V) float32 log-softmax kept, gradients formed from it in
  the backward (common/losses/fused_logprobs.py), no recomputed logits.

The plain version's memory is measured at the sizes in ``--rows`` (the largest is the side-by-side size) and
extrapolated linearly to ``--full`` when it would exceed ``--max-gib`` there (this machine is shared: no
process of ours holds more than ~5 GiB); chunked and fused are measured at ``--full`` directly.

Load: the 1-minute load average is recorded before the run and after it. The machine counts as shared when
the load before exceeded 0.5, or the load after exceeded this run's threads + 0.5; then the results are
printed but not written unless ``--allow-shared`` (and the report says so).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
import torch  # noqa: E402

from bench import fmt_bytes, fmt_s, mark, median, progress, setup_threads, sync, table, write_result  # noqa: E402

V, H = 49_152, 576
CHUNK_DEFAULT = 1024  # token_logprobs' default chunk_size
SHARED_LOAD = 0.5  # load average above which (beyond our own threads) the machine counts as shared


def plain(hidden, weight, targets):
    """The naive reference: full float32 logits, log_softmax, gather; entropy from the same log-softmax."""
    logits = hidden @ weight.T  # (N, V)
    logp_all = logits.float().log_softmax(-1)  # (N, V) float32
    del logits  # log_softmax's backward needs only its output
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N,)
    return logp, entropy


def chunked(hidden, weight, targets):
    from common.losses.logprobs import token_logprobs

    return token_logprobs(hidden, weight, targets, kernel="chunked", recompute=True)  # default chunk_size


def fused(hidden, weight, targets):
    from common.losses.logprobs import token_logprobs

    return token_logprobs(hidden, weight, targets, kernel="fused")  # default chunk_size


VARIANTS = {"plain": plain, "chunked": chunked, "fused": fused}


def inputs(n: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = norm = None
    try:
        from safetensors import safe_open

        from common.models import cache_dir

        path = cache_dir() / "SmolLM2-135M-Instruct" / "model.safetensors"
        if path.exists():
            with safe_open(str(path), "pt") as f:
                weight, norm = f.get_tensor("model.embed_tokens.weight").float(), f.get_tensor("model.norm.weight").float()
    except Exception:  # noqa: BLE001 -- the benchmark also runs without the bundled model
        weight = None
    source = "SmolLM2-135M embedding"
    if weight is None or tuple(weight.shape) != (V, H):
        weight, norm, source = torch.randn(V, H, generator=g) * 0.05, torch.ones(H), "random N(0, 0.05²)"
    hidden = torch.randn(n, H, generator=g) * norm  # (N, H)
    targets = torch.randint(0, V, (n,), generator=g)
    return hidden.to(device), weight.contiguous().to(device), targets.to(device), source


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmRSS")


def _peak_rss() -> int:
    """VmHWM (peak RSS of this process). Not getrusage's ru_maxrss: on Linux a child started by fork+exec
    inherits its parent's ru_maxrss, so a worker would report the launching benchmark's (larger) peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _rss_now()
        return True
    except OSError:
        return False


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def upstream(n: int, device: str):
    """Fixed per-token upstream gradients (c_lp, c_ent) ~ N(0, 1): what a per-token loss hands back."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device)


def fwd_bwd(fn, hidden, weight, targets):
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    c_lp, c_ent = upstream(hidden.shape[0], hidden.device.type)
    lp, ent = fn(h, w, targets)
    ((c_lp * lp).sum() + (c_ent * ent).sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def mem_worker(variant: str, n: int, device: str, threads: int) -> None:
    """Fresh process: peak memory increase of one forward+backward (after a tiny warm-up)."""
    setup_threads(threads)
    hidden, weight, targets, _ = inputs(n, device)
    fwd_bwd(VARIANTS[variant], hidden[:64], weight, targets[:64])  # load kernels, allocator warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    # Loading the inputs (safetensors pages) may already have set a high-water mark above what the
    # forward+backward reaches; Linux resets it on "5" > /proc/self/clear_refs (ru_maxrss and VmHWM both).
    reset = _reset_peak_rss()
    before = _rss_now() if reset else _peak_rss()
    t0 = time.perf_counter()
    out = fwd_bwd(VARIANTS[variant], hidden, weight, targets)
    seconds = time.perf_counter() - t0
    after = _peak_rss()
    res = {"rss_increase": after - before, "rss_before": before, "rss_after": after, "peak_reset": reset, "seconds": seconds}
    if device == "cuda":
        torch.cuda.synchronize()
        res["cuda_peak_increase"] = torch.cuda.max_memory_allocated() - base
    del out
    print("RESULT " + json.dumps(res))


def peak_memory(variant: str, n: int, device: str) -> dict:
    cmd = [sys.executable, __file__, "--mem-worker", variant, "--n", str(n), "--device", device,
           "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"}


def alternate_wall_cpu(fns, reps: int, device: str, on_result):
    """1 warm-up each, then ``reps`` rounds A B C ...: wall seconds and CPU seconds (this process, all threads)
    per call. CPU time is the robust number on a shared machine (a descheduled process accrues none) when the
    run uses one thread (``--threads 1``); with more, OpenMP's spin-waits inflate it."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for k, f in fns.items():
        on_result(k, f())
    for _ in progress(range(reps), f"{', '.join(fns)}: repetitions"):
        for k, f in fns.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            out = f()
            sync(device)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
            on_result(k, out)
            del out
    return wall, cpu


def shared_verdict(load_before: float, load_after: float, threads: int) -> str | None:
    """None when the machine looks idle apart from this run; else a sentence saying why it counts as shared."""
    reasons = []
    if load_before > SHARED_LOAD:
        reasons.append(f"1-min load {load_before:.2f} before the run (> {SHARED_LOAD})")
    if load_after > threads + SHARED_LOAD:
        reasons.append(f"1-min load {load_after:.2f} after it (> this run's {threads} threads + {SHARED_LOAD})")
    return "; ".join(reasons) or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: N = 2 x 128 only")
    ap.add_argument("--rows", default="2x512,4x512", help="B x T sizes for plain's memory; the largest is the side-by-side size")
    ap.add_argument("--full", default="16x512", help="the target size B x T (chunked and fused measured there; plain extrapolated past --max-gib)")
    ap.add_argument("--max-gib", type=float, default=5.0, help="largest peak memory (GiB) a plain measurement may take")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1: CPU time is a clean measure under load)")
    ap.add_argument("--allow-shared", action="store_true", help="write results even when the load average shows the machine shared")
    ap.add_argument("--mem-worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_worker:
        return mem_worker(args.mem_worker, args.n, args.device, args.threads)
    setup_threads(args.threads)
    load_before = os.getloadavg()

    def rows(s):
        b, t = (int(x) for x in s.split("x"))
        return b * t, s

    if args.quick:
        sizes, full = [rows("1x128"), rows("2x128")], rows("2x128")
    else:
        sizes, full = sorted(rows(s) for s in args.rows.split(",")), rows(args.full)
    n_cmp, cmp_label = sizes[-1]
    dev = args.device

    # ---- side by side: time, values, gradients (A B C A B C ...)
    hidden, weight, targets, source = inputs(n_cmp, dev)
    last: dict[str, tuple] = {}
    times, cpu = alternate_wall_cpu({k: (lambda f=f: fwd_bwd(f, hidden, weight, targets)) for k, f in VARIANTS.items()},
                                    reps=args.reps, device=dev, on_result=lambda k, v: last.__setitem__(k, v))
    ref = last["plain"]
    diffs = {}
    for v in ("chunked", "fused"):
        o = last[v]
        diffs[v] = {"logprobs": (ref[0] - o[0]).abs().max().item(), "entropy": (ref[1] - o[1]).abs().max().item(),
                    "grad hidden": (ref[2] - o[2]).abs().max().item() / ref[2].abs().max().item(),
                    "grad weight": (ref[3] - o[3]).abs().max().item() / ref[3].abs().max().item()}
    # float64 truth on the first k rows: every variant again on those rows (values, grad hidden, grad weight)
    k = min(256, n_cmp)
    h64, w64 = hidden[:k].double().requires_grad_(True), weight.double().requires_grad_(True)
    l64 = (h64 @ w64.T).log_softmax(-1)
    lp64, ent64 = l64.gather(-1, targets[:k, None]).squeeze(-1), -(l64.exp() * l64).sum(-1)
    c_lp, c_ent = upstream(k, dev)
    ((c_lp.double() * lp64).sum() + (c_ent.double() * ent64).sum()).backward()
    err64 = {}
    for v, f in VARIANTS.items():
        o = fwd_bwd(f, hidden[:k], weight, targets[:k])
        err64[v] = {"values": max((o[0].double() - lp64).abs().max().item(), (o[1].double() - ent64).abs().max().item()),
                    "grad hidden": (o[2].double() - h64.grad).abs().max().item() / h64.grad.abs().max().item(),
                    "grad weight": (o[3].double() - w64.grad).abs().max().item() / w64.grad.abs().max().item()}
    del last, ref, l64, h64, w64, lp64, ent64
    med = {v: median(times[v]) for v in VARIANTS}
    med_cpu = {v: median(cpu[v]) for v in VARIANTS}
    del hidden, weight, targets

    # ---- peak memory, fresh subprocess per variant
    key = "cuda_peak_increase" if dev == "cuda" else "rss_increase"
    mem_rows, mem = [], {}

    def measure(v, n, label):
        mem[(v, n)] = m = peak_memory(v, n, dev)
        mem_rows.append([label, f"{n:,}", v, fmt_bytes(m[key]) if key in m else m["error"], "measured"])

    for n, label in sizes:
        for v in VARIANTS:
            measure(v, n, label)
    full_n, full_label = full
    if full_n not in {n for n, _ in sizes}:
        for v in ("chunked", "fused"):
            measure(v, full_n, full_label)
        (n0, _), (n1, _) = sizes[0], sizes[-1]
        p0, p1 = mem[("plain", n0)].get(key), mem[("plain", n1)].get(key)
        est = p1 + (p1 - p0) / (n1 - n0) * (full_n - n1) if p0 is not None and p1 is not None and n1 > n0 else None
        cap = min(args.max_gib * 2**30, 0.8 * mem_available()) if dev == "cpu" else args.max_gib * 2**30
        if est is not None and est < cap:
            measure("plain", full_n, full_label)
        elif est is not None:
            mem[("plain", full_n)] = {key: est, "extrapolated": True}
            mem_rows.append([full_label, f"{full_n:,}", "plain", fmt_bytes(est),
                             f"extrapolated linearly from {sizes[0][1]} and {sizes[-1][1]} (would exceed {fmt_bytes(cap)})"])

    def mratio(v, n):
        a, b = mem.get((v, n), {}), mem.get(("plain", n), {})
        return a[key] / b[key] if key in a and key in b else None

    load_after = os.getloadavg()
    shared = shared_verdict(load_before[0], load_after[0], torch.get_num_threads())
    body = ""
    if shared:
        body += f"**SHARED MACHINE: {shared}. Timings are not clean.**\n\n"
    body += (f"Forward + backward of `sum(c_lp * logprobs) + sum(c_ent * entropy)` (random per-token c) to hidden and "
             f"weight; V = {V:,}, H = {H} (SmolLM2-135M), weight = {source}, device {dev}, chunk_size = {CHUNK_DEFAULT}. "
             f"Side by side at N = {cmp_label} = {n_cmp:,} rows, {args.reps} alternating reps after 1 warm-up each. "
             f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
             f"{', '.join(f'{x:.2f}' for x in load_after)}.\n\n")
    body += (f"## Time (side by side, {torch.get_num_threads()} thread(s); wall and CPU seconds of this process)\n\n" + table(
        ["variant", "wall median", "wall / plain", "CPU median", "CPU / plain", "wall reps (s)", "CPU reps (s)"],
        [[v, fmt_s(med[v]), f"{med[v] / med['plain']:.2f}x", fmt_s(med_cpu[v]), f"{med_cpu[v] / med_cpu['plain']:.2f}x",
          ", ".join(f"{t:.2f}" for t in times[v]), ", ".join(f"{t:.2f}" for t in cpu[v])] for v in VARIANTS]))
    for v in ("chunked", "fused"):
        t_full = mem.get((v, full_n), {}).get("seconds")
        if t_full and full_n != n_cmp:
            body += (f"\n{v} alone at N = {full_label} = {full_n:,} (its memory subprocess): {fmt_s(t_full)}, i.e. "
                     f"{t_full / full_n * n_cmp:.2f} s per {n_cmp:,} rows vs {med[v]:.2f} s side by side.")
    body += "\n\n## Peak memory (fresh subprocess per variant; increase of peak RSS (VmHWM) over one forward+backward)\n\n"
    body += table(["size", "N", "variant", "peak increase", "how"], mem_rows)
    ratio_rows = []
    for n, label in sorted({(n, lbl) for n, lbl in sizes} | {full}):
        r = {v: mratio(v, n) for v in ("chunked", "fused")}
        ex = " (plain extrapolated)" if mem.get(("plain", n), {}).get("extrapolated") else ""
        ratio_rows.append([f"{label} = {n:,}"] + [f"{r[v]:.3f}x{ex}" if r[v] is not None else "-" for v in ("chunked", "fused")])
    body += "\n" + table(["N", "chunked / plain", "fused / plain"], ratio_rows)
    body += ("\n## Values and gradients\n\nvs plain: max abs difference of the last rep (gradients relative to max |plain "
             f"grad|). vs float64: each variant rerun on the first {k} rows against a float64 computation (values: max abs "
             "error over logprobs and entropy; gradients: max abs error / max |float64 grad|).\n\n")
    quant = ("values", "grad hidden", "grad weight")
    body += table(["variant", "vs plain: logprobs", "entropy", "grad hidden", "grad weight"] + [f"vs float64: {q}" for q in quant],
                  [[v, *(f"{diffs[v][q]:.1e}" for q in ("logprobs", "entropy", "grad hidden", "grad weight")),
                    *(f"{err64[v][q]:.1e}" for q in quant)] for v in ("chunked", "fused")] +
                  [["plain", "", "", "", "", *(f"{err64['plain'][q]:.1e}" for q in quant)]])
    tr, tr_cpu = med["fused"] / med["plain"], med_cpu["fused"] / med_cpu["plain"]
    rf = [x for x in (mratio("fused", n_cmp), mratio("fused", full_n)) if x is not None]
    # "equal to the plain computation within float32 rounding": fused's error against float64 at most twice
    # plain's own (both are float32 computations of the same sums, in different orders)
    within = {q: err64["fused"][q] <= 2 * err64["plain"][q] for q in quant}
    targets_rows = [
        ["fused time <= 1.1x plain (wall)", f"{tr:.2f}x at N = {n_cmp:,}", mark(tr <= 1.1)],
        ["fused time <= 1.1x plain (CPU)", f"{tr_cpu:.2f}x at N = {n_cmp:,}", mark(tr_cpu <= 1.1)],
        ["fused peak memory <= 0.25x plain", ", ".join(f"{x:.3f}x" for x in rf) + f" at N = {n_cmp:,}, {full_n:,}",
         mark(bool(rf) and max(rf) <= 0.25)],
        *[[f"fused {q}: error vs float64 <= 2x plain's", f"{err64['fused'][q]:.1e} vs plain {err64['plain'][q]:.1e}", mark(within[q])]
          for q in quant],
    ]
    body += "\n## Targets\n\n" + table(["target", "measured", "result"], targets_rows)
    if args.quick:
        body = "**QUICK smoke run (N = 2 x 128), not the benchmark.**\n\n" + body
    if shared and not args.allow_shared:
        print(body)
        print(f"NOT WRITTEN: the machine was shared ({shared}); rerun on an idle machine or pass --allow-shared")
        sys.exit(3)
    write_result("logprobs" + ("_quick" if args.quick else ""), "token_logprobs kernels: plain vs chunked vs fused", body)


if __name__ == "__main__":
    main()
