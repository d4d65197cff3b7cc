"""token_logprobs (chunked, checkpointed selective log-softmax + entropy) vs the plain full-logits version.

    .venv/bin/python benchmarks/logprobs.py            # full: V = 49,152, H = 576 (SmolLM2), N = B x T
    .venv/bin/python benchmarks/logprobs.py --quick    # smoke: N = 8 x 128

Both variants run forward AND backward of ``sum(logprobs) + sum(entropy)`` to ``hidden`` and ``weight``.
Time and values/gradients are compared side by side in one process (A B A B ...). Peak memory is measured in a
fresh subprocess per variant: the increase of the peak RSS (VmHWM) over one forward+backward (on CUDA
``torch.cuda.max_memory_allocated``). The weight is SmolLM2-135M's tied embedding (random if the bundled
model is not cached); hidden rows are N(0, 1) scaled by its final RMSNorm weight; targets are uniform ids.

The plain version holds several float32 (N, V) tensors (logits, log-softmax, its exp, their gradients): at
N = 64 x 512 one is 6.4 GB and forward+backward needs about 5 of them, more than this machine's RAM. So the
side-by-side comparison runs at the largest N in ``--rows`` (default 16 x 512), the plain version's memory is
also measured at a smaller N, and its memory at N = 64 x 512 is extrapolated linearly (stated as such);
ours is measured at N = 64 x 512 directly (time and memory).
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

from bench import alternate, fmt_bytes, fmt_s, mark, median, setup_threads, table, write_result  # noqa: E402

V, H = 49_152, 576
CHUNK_DEFAULT = 1024  # token_logprobs' default chunk_size


def plain(hidden, weight, targets):
    """The naive reference: full float32 logits, log_softmax, gather; entropy from the same log-softmax."""
    logits = hidden @ weight.T  # (N, V)
    logp_all = logits.float().log_softmax(-1)  # (N, V) float32
    del logits  # log_softmax's backward needs only its output
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N,)
    return logp, entropy


def ours(hidden, weight, targets):
    from common.losses.logprobs import token_logprobs

    return token_logprobs(hidden, weight, targets)  # default chunk_size


VARIANTS = {"plain": plain, "ours": ours}


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


def fwd_bwd(fn, hidden, weight, targets):
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    lp, ent = fn(h, w, targets)
    (lp.sum() + ent.sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


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


def mem_worker(variant: str, n: int, device: str) -> None:
    """Fresh process: peak memory increase of one forward+backward (after a tiny warm-up)."""
    setup_threads()
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
    cmd = [sys.executable, __file__, "--mem-worker", variant, "--n", str(n), "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"}


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: N = 8 x 128 only")
    ap.add_argument("--rows", default="4x512,16x512", help="B x T sizes for plain's memory; the largest is the side-by-side size")
    ap.add_argument("--full", default="64x512", help="the target size B x T (ours measured there; plain extrapolated if it won't fit)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mem-worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_worker:
        return mem_worker(args.mem_worker, args.n, args.device)
    setup_threads()

    def rows(s):
        b, t = (int(x) for x in s.split("x"))
        return b * t, s

    if args.quick:
        sizes, full = [rows("8x128")], rows("8x128")
    else:
        sizes, full = sorted(rows(s) for s in args.rows.split(",")), rows(args.full)
    n_cmp, cmp_label = sizes[-1]
    dev = args.device

    # ---- side by side: time, values, gradients (A B A B ...)
    hidden, weight, targets, source = inputs(n_cmp, dev)
    last: dict[str, tuple] = {}
    times = alternate({k: (lambda f=f: fwd_bwd(f, hidden, weight, targets)) for k, f in VARIANTS.items()},
                      reps=args.reps, warmup=1, device=dev, on_result=lambda k, v: last.__setitem__(k, v))
    (lp_p, ent_p, gh_p, gw_p), (lp_o, ent_o, gh_o, gw_o) = last["plain"], last["ours"]
    d_lp, d_ent = (lp_p - lp_o).abs().max().item(), (ent_p - ent_o).abs().max().item()
    d_gh, d_gw = (gh_p - gh_o).abs().max().item(), (gw_p - gw_o).abs().max().item()
    rel_gh, rel_gw = d_gh / gh_p.abs().max().item(), d_gw / gw_p.abs().max().item()
    # float64 truth on the first rows: which of the two is closer
    k = min(512, n_cmp)
    with torch.no_grad():
        l64 = (hidden[:k].double() @ weight.double().T).log_softmax(-1)
        lp64, ent64 = l64.gather(-1, targets[:k, None]).squeeze(-1), -(l64.exp() * l64).sum(-1)
    err64 = {name: max((lp[:k].double() - lp64).abs().max().item(), (en[:k].double() - ent64).abs().max().item())
             for name, lp, en in (("plain", lp_p, ent_p), ("ours", lp_o, ent_o))}
    del last, lp_p, ent_p, gh_p, gw_p, lp_o, ent_o, gh_o, gw_o, l64
    t_plain, t_ours = median(times["plain"]), median(times["ours"])

    del hidden, weight, targets

    # ---- peak memory, fresh subprocess per variant
    key = "cuda_peak_increase" if dev == "cuda" else "rss_increase"
    mem_rows, mem = [], {}
    for n, label in sizes:
        for v in VARIANTS:
            mem[(v, n)] = peak_memory(v, n, dev)
            mem_rows.append([label, n, v, fmt_bytes(mem[(v, n)][key]) if key in mem[(v, n)] else mem[(v, n)]["error"], "measured"])
    full_n, full_label = full
    if full_n not in {n for n, _ in sizes}:
        mem[("ours", full_n)] = peak_memory("ours", full_n, dev)
        m = mem[("ours", full_n)]
        mem_rows.append([full_label, full_n, "ours", fmt_bytes(m[key]) if key in m else m["error"], "measured"])
        (n0, _), (n1, _) = sizes[0], sizes[-1]
        p0, p1 = mem[("plain", n0)].get(key), mem[("plain", n1)].get(key)
        est = p1 + (p1 - p0) / (n1 - n0) * (full_n - n1) if p0 is not None and p1 is not None and n1 > n0 else None
        if est is not None and dev == "cpu" and est < 0.8 * mem_available():
            mem[("plain", full_n)] = peak_memory("plain", full_n, dev)
            m = mem[("plain", full_n)]
            mem_rows.append([full_label, full_n, "plain", fmt_bytes(m[key]) if key in m else m["error"], "measured"])
        elif est is not None:
            mem[("plain", full_n)] = {key: est, "extrapolated": True}
            mem_rows.append([full_label, full_n, "plain", fmt_bytes(est),
                             f"extrapolated linearly from {sizes[0][1]} and {sizes[-1][1]} (needs more than 80% of the "
                             f"{fmt_bytes(mem_available())} available)"])
    ratio_cmp = mem[("ours", n_cmp)][key] / mem[("plain", n_cmp)][key]
    full_ratio = None
    if ("plain", full_n) in mem and key in mem[("plain", full_n)] and key in mem.get(("ours", full_n), {}):
        full_ratio = mem[("ours", full_n)][key] / mem[("plain", full_n)][key]

    tr = t_ours / t_plain
    body = (f"Forward + backward of `sum(logprobs) + sum(entropy)` to hidden and weight; V = {V:,}, H = {H} "
            f"(SmolLM2-135M), weight = {source}, device {dev}, `token_logprobs` default chunk_size = {CHUNK_DEFAULT}. "
            f"Side by side at N = {cmp_label} = {n_cmp:,} rows, {args.reps} alternating reps after 1 warm-up each.\n\n")
    body += "## Time (side by side)\n\n" + table(
        ["N", "plain (median)", "ours (median)", "ours / plain", "plain reps", "ours reps"],
        [[f"{cmp_label} = {n_cmp:,}", fmt_s(t_plain), fmt_s(t_ours), f"{tr:.2f}x",
          ", ".join(f"{t:.2f}" for t in times["plain"]), ", ".join(f"{t:.2f}" for t in times["ours"])]])
    t_ours_full = mem.get(("ours", full_n), {}).get("seconds")
    if t_ours_full and full_n != n_cmp:
        body += (f"\nOurs alone at N = {full_label} = {full_n:,} (the one forward+backward of its memory subprocess): "
                 f"{fmt_s(t_ours_full)}, i.e. {t_ours_full / full_n * n_cmp:.2f} s per {n_cmp:,} rows vs "
                 f"{t_ours:.2f} s measured side by side at {n_cmp:,}.\n")
    body += "\n## Peak memory (fresh subprocess per variant; increase of peak RSS (VmHWM) over one forward+backward)\n\n"
    body += table(["size", "N", "variant", "peak increase", "how"], mem_rows)
    body += "\n## Values and gradients (last rep of each)\n\n" + table(
        ["quantity", "max abs diff ours vs plain", "relative to max abs plain"],
        [["logprobs", f"{d_lp:.2e}", ""], ["entropy", f"{d_ent:.2e}", ""],
         ["grad hidden", f"{d_gh:.2e}", f"{rel_gh:.2e}"], ["grad weight", f"{d_gw:.2e}", f"{rel_gw:.2e}"],
         [f"float64 truth, first {k} rows (max over logprobs, entropy)", f"plain {err64['plain']:.2e}, ours {err64['ours']:.2e}", ""]])
    targets_rows = [
        ["peak memory <= 0.25x plain", f"{ratio_cmp:.3f}x at N = {n_cmp:,}" + (f"; {full_ratio:.3f}x at N = {full_n:,}"
         + (" (plain extrapolated)" if mem.get(("plain", full_n), {}).get("extrapolated") else "") if full_ratio else ""),
         mark(ratio_cmp <= 0.25 and (full_ratio is None or full_ratio <= 0.25))],
        ["time <= 1.2x plain", f"{tr:.2f}x at N = {n_cmp:,}", mark(tr <= 1.2)],
        ["values equal to 1e-5", f"logprobs {d_lp:.1e}, entropy {d_ent:.1e}", mark(max(d_lp, d_ent) <= 1e-5)],
        ["gradients equal to 1e-5 (relative to max abs grad)", f"hidden {rel_gh:.1e}, weight {rel_gw:.1e}", mark(max(rel_gh, rel_gw) <= 1e-5)],
    ]
    body += "\n## Targets\n\n" + table(["target", "measured", "result"], targets_rows)
    if args.quick:
        body = "**QUICK smoke run (N = 8 x 128), not the benchmark.**\n\n" + body
    write_result("logprobs" + ("_quick" if args.quick else ""), "token_logprobs vs plain log-softmax", body)


if __name__ == "__main__":
    main()
