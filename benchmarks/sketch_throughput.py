"""Gradient sketching throughput, quality and memory (SkMM stage 1).

Compares the engine (``core.sketch_engine.GradientSketcher``: factored per-sample gradients, hashed
sketches) with what research code does: ``torch.func.vmap`` per-sample gradients, then a dense
Gaussian projection (the map drawn once and held whole; drawing it is not timed). Everything runs in
this one invocation on the same machine; each timing is the best of ``--repeats`` runs.

Two ways to use the 2 cores are timed for the engine: one process with 2 torch threads, and the shard
split the pipeline uses (2 processes, 1 thread each, half of the samples each; their rows are checked
bit-identical to the one-process rows). The baseline runs in one process with 2 threads (its time is
in large matrix products, which use both threads well).

FT-1: a ResNet-18-sized head, 512 features + bias -> 196 classes (r = 100,548), on synthetic
penultimate features (196 clustered classes of Zipf-like sizes, ReLU, a class-mean head at ~88%
accuracy, median p_y ~0.27), true labels. Exact quantities in closed form: ``||g_i||^2 = ||d_i||^2
||x~_i||^2`` and the gradient Gram ``(D D^T) o (X~ X~^T)``.
FT-2: a small conv+linear head (conv3x3 32->32 on 8x8 maps, ReLU, global average pool, linear 32->10;
r = 9,578), true labels; exact gradients formed from the factors (tested equal to vmap). The engine's
default ("auto") CountSketches this small conv block's formed gradient; TensorSketch is shown too.
Quality, averaged over ``--quality-seeds`` sketch seeds: top-32 subspace overlap
``||U_exact^T U_sketch||_F^2 / 32`` (top eigenvectors of the exact and the sketched N x N Gram) and the
mean per-sample relative squared-norm error ``mean_i | ||g~_i||^2 / ||g_i||^2 - 1 |``.
Memory bandwidth: best of 5 copies of a 256 MiB tensor (read + write). "I/O" counts the bytes a sample
must move (features, label, sketch row); "traffic" adds the intermediate tensors the engine allocates
per sample (torch profiler), each written once and read once.
Peak RSS (VmHWM): a fresh process sketches N samples generated batch by batch (no input array), output
kept in memory.

    python benchmarks/sketch_throughput.py [--n 10000] [--m 1024] [--baseline-n 2000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.profiler import ProfilerActivity, profile

from skmm_pipeline.core.gradients import to_layer_layout
from skmm_pipeline.core.sketch_engine import GradientSketcher


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth() -> float:
    a = torch.ones(64 << 20)
    b = torch.empty_like(a)
    t = best_time(lambda: b.copy_(a), 5)
    return 2 * a.numel() * 4 / t


# --- the two scenarios --------------------------------------------------------------------------------


def ft1_data(N: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    d, K, latent = 512, 196, 48
    w = 1.0 / (np.arange(K) + 8) ** 1.2
    y = rng.choice(K, size=N, p=w / w.sum())
    mix = rng.normal(size=(latent, d)) / np.sqrt(latent)
    centers = rng.normal(size=(K, latent)) * rng.uniform(0.5, 2.0, size=(K, 1))
    X = np.maximum(0, centers[y] @ mix + 0.35 * rng.normal(size=(N, d)) + 0.2).astype(np.float32)
    return X, y, centers, mix


def ft1_head(X, y, K=196) -> nn.Linear:
    Xt = np.concatenate([X, np.ones((len(X), 1), np.float32)], 1)
    means = np.stack([Xt[y == c].mean(0) if (y == c).any() else Xt.mean(0) for c in range(K)])
    W = means - means.mean(0)
    W = 0.3 * W / np.linalg.norm(W, axis=1, keepdims=True)  # median p_y ~0.27, accuracy ~88%
    head = nn.Linear(X.shape[1], K)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(W[:, :-1]))
        head.bias.copy_(torch.from_numpy(W[:, -1]))
    return head


def setup_ft1(N: int):
    X, y, _, _ = ft1_data(N)
    return ft1_head(X, y), "ft1", ["weight", "bias"], X, y


def setup_ft2(N: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10))
    rng = np.random.default_rng(1)
    K, latent = 10, 16
    y = rng.integers(0, K, N)
    proto = rng.normal(size=(K, latent))
    mix = rng.normal(size=(latent, 32 * 8 * 8)) / np.sqrt(latent)
    X = np.maximum(0, proto[y] @ mix + 0.5 * rng.normal(size=(N, 32 * 8 * 8))).astype(np.float32).reshape(N, 32, 8, 8)
    return model, ["0", "4"], ["0.weight", "0.bias", "4.weight", "4.bias"], X, y


SETUPS = {"ft1": setup_ft1, "ft2": setup_ft2}


# --- measurements ---------------------------------------------------------------------------------------


def top_eigvecs(matvec, N: int, k: int, block: int = 64, iters: int = 8, seed: int = 0) -> torch.Tensor:
    """Top-k eigenvectors of a PSD N x N operator by block Krylov + Rayleigh-Ritz (float64)."""
    gen = torch.Generator().manual_seed(seed)
    V = torch.linalg.qr(matvec(torch.randn(N, block, dtype=torch.float64, generator=gen)))[0]
    basis = [V]
    for _ in range(iters):
        V = torch.linalg.qr(matvec(V))[0]
        basis.append(V)
    Q = torch.linalg.qr(torch.cat(basis, 1))[0]
    ev, U = torch.linalg.eigh(Q.T @ matvec(Q))
    U = Q @ U.flip(1)[:, :k]
    ev = ev.flip(0)[:k]
    resid = ((matvec(U) - U * ev).norm(dim=0) / ev).max().item()
    if resid > 1e-4:
        raise RuntimeError(f"eigenvectors of the exact Gram did not converge (residual {resid:.1e})")
    return U


def sketch_top(S: np.ndarray, k: int) -> torch.Tensor:
    U, _, _ = torch.linalg.svd(torch.from_numpy(S).double(), full_matrices=False)
    return U[:, :k]


def quality(S: np.ndarray, U_exact: torch.Tensor, exact_sq: np.ndarray) -> tuple[float, float]:
    overlap = float((U_exact.T @ sketch_top(S, U_exact.shape[1])).pow(2).sum() / U_exact.shape[1])
    sq_err = float(np.mean(np.abs((S.astype(np.float64) ** 2).sum(1) / exact_sq - 1)))
    return overlap, sq_err


def allocated_bytes_per_sample(sk: GradientSketcher, X, labels, rows: int) -> float:
    """Bytes allocated by the engine's intermediate tensors per sample (torch profiler, CPU)."""
    saved = os.dup(2)  # the profiler backend logs to stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            sk.sketch(X[:rows], labels=labels[:rows], batch_size=rows)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return sum(max(0, e.self_cpu_memory_usage) for e in prof.events()) / rows


def vmap_dense(model: nn.Module, param_names, X: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, batch: int):
    """Research-code baseline: per-sample gradients by vmap(grad), then rows @ dense Gaussian."""
    params = {k: v.detach() for k, v in model.named_parameters() if k in param_names}
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in param_names}

    def loss(p, x, t):
        return nn.functional.cross_entropy(functional_call(model, {**frozen, **p}, (x[None],)), t[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    out = []
    for s in range(0, len(X), batch):
        g = per_sample(params, X[s : s + batch], y[s : s + batch])
        G = torch.cat([g[k].reshape(g[k].shape[0], -1) for k in param_names], 1)
        out.append(G @ gamma)
    return torch.cat(out)


def baseline_gamma(model, layers, op_gammas) -> torch.Tensor:
    """The engine's Gaussian map, rows permuted to the baseline's [vec W, b] gradient layout."""
    gamma = torch.cat(op_gammas)  # factored layout [W | b] per layer
    idx = to_layer_layout(model, layers, torch.arange(gamma.shape[0], dtype=torch.float64)[None]).long()[0]
    out = torch.empty_like(gamma)
    out[idx] = gamma
    return out


def _shard_worker(setup, n, lo, hi, m, kind, repeats, barrier, out_dir, part):
    torch.set_num_threads(1)
    model, layers, _, X, y = SETUPS[setup](n)
    sk = GradientSketcher(model, m, kind=kind, layers=layers, label_mode="true", model_id=setup)
    sk.sketch(X[lo : min(hi, lo + 2048)], labels=y[lo : min(hi, lo + 2048)])  # warm-up
    times = []
    for _ in range(repeats):
        barrier.wait()
        t0 = time.monotonic()
        rows = sk.sketch(X[lo:hi], labels=y[lo:hi], batch_size=hi - lo)
        times.append((t0, time.monotonic()))
    np.save(Path(out_dir) / f"part{part}.npy", rows)
    (Path(out_dir) / f"part{part}.json").write_text(json.dumps(times))


def sharded_rate(setup: str, n: int, m: int, kind: str, procs: int, repeats: int) -> tuple[float, np.ndarray]:
    """Samples/s of ``procs`` single-threaded processes sketching contiguous shards side by side."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(procs)
    bounds = np.linspace(0, n, procs + 1).astype(int)
    with tempfile.TemporaryDirectory() as d:
        ps = [ctx.Process(target=_shard_worker, args=(setup, n, int(bounds[i]), int(bounds[i + 1]), m, kind, repeats,
                                                      barrier, d, i)) for i in range(procs)]
        for p in ps:
            p.start()
        for p in ps:
            p.join()
        if any(p.exitcode != 0 for p in ps):
            raise RuntimeError("a shard worker failed")
        times = [json.loads((Path(d) / f"part{i}.json").read_text()) for i in range(procs)]
        walls = [max(t[r][1] for t in times) - min(t[r][0] for t in times) for r in range(repeats)]
        rows = np.concatenate([np.load(Path(d) / f"part{i}.npy") for i in range(procs)])
    return n / min(walls), rows


def run_table(setup, title, args, bw, exact_top, exact_sq, io_bytes, kinds):
    model, layers, param_names, X, y = SETUPS[setup](args.n)
    N, m, T = len(X), args.m, torch.get_num_threads()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    U_exact = exact_top()
    results, lines = {}, []

    # Baseline (and the dense Gaussian reference sketch, seed 0, from the engine: the same map).
    gs = GradientSketcher(model, m, kind="gaussian", layers=layers, label_mode="true", seed=0, model_id=setup,
                          block_rows=2048)
    gs.prepare(X[:16])
    gamma = baseline_gamma(model, layers, [op.dense() for _, op in gs.sketches])
    nb = min(args.baseline_n, N)
    vmap_dense(model, param_names, Xt[:64], yt[:64], gamma, batch=64)  # warm-up
    Sb = None

    def run_base():
        nonlocal Sb
        Sb = vmap_dense(model, param_names, Xt[:nb], yt[:nb], gamma, batch=256)

    base_rate = nb / best_time(run_base, 2)
    q_g = []
    for seed in range(args.quality_seeds):
        S_g = GradientSketcher(model, m, kind="gaussian", layers=layers, label_mode="true", seed=seed, model_id=setup,
                               block_rows=2048).sketch(X, labels=y)
        if seed == 0:
            agree = float(np.linalg.norm(Sb.numpy() - S_g[:nb]) / np.linalg.norm(S_g[:nb]))
        q_g.append(quality(S_g, U_exact, exact_sq))
    q_g = np.mean(q_g, axis=0)
    lines.append(("vmap + dense Gaussian", f"1 proc x {T} threads", base_rate, q_g))

    best_rate, best_cfg, traffic = 0.0, "", 0.0
    for kind in kinds:
        sk = GradientSketcher(model, m, kind=kind, layers=layers, label_mode="true", seed=0, model_id=setup)
        sk.sketch(X[: min(N, 2048)], labels=y[: min(N, 2048)])  # warm-up
        S = None

        def run():
            nonlocal S
            S = sk.sketch(X, labels=y, batch_size=N)

        rate = N / best_time(run, args.repeats)
        q = np.mean([quality(S if s == 0 else GradientSketcher(model, m, kind=kind, layers=layers, label_mode="true",
                                                                 seed=s, model_id=setup).sketch(X, labels=y),
                             U_exact, exact_sq) for s in range(args.quality_seeds)], axis=0)
        name = {"tensorsketch": "TensorSketch", "countsketch": "CountSketch (auto)"}[kind]
        lines.append((name, f"1 proc x {T} threads", rate, q))
        shard_rate, shard_rows = sharded_rate(setup, N, m, kind, T, args.repeats)
        same = np.array_equal(shard_rows, S)
        lines.append((name, f"{T} procs x 1 thread", shard_rate, q if same else (np.nan, np.nan)))
        for r, cfg in ((rate, f"1 proc x {T} threads"), (shard_rate, f"{T} procs x 1 thread")):
            if r > best_rate:
                best_rate, best_cfg = r, f"{name}, {cfg}"
        if kind == kinds[0]:
            traffic = allocated_bytes_per_sample(sk, X, y, min(N, 2048)) * 2 + io_bytes
            results.update({"quality_kind": kind, "overlap_top32_sketch": q[0], "sqnorm_rel_error_sketch": q[1]})
        results[f"{kind}_samples_per_s_1proc"] = rate
        results[f"{kind}_samples_per_s_{T}procs"] = shard_rate
        results[f"{kind}_shard_rows_identical"] = float(same)

    print(f"\n{title}: r = {gs.gradient_dim:,}, N = {N:,}, m = {m}. vmap + dense timed on the first {nb:,} samples"
          f" (its rows equal the engine's Gaussian sketch to {agree:.1e} relative); quality: mean over"
          f" {args.quality_seeds} sketch seeds")
    print(f"{'method':<24}{'cores':<21}{'samples/s':>11}{'speed-up':>10}{'top-32 overlap':>16}{'|dsq|/sq':>10}")
    for name, cfg, rate, (ov, err) in lines:
        tail = f"{ov:>16.4f}{err:>10.4f}" if np.isfinite(ov) else f"{'(rows differ!)':>26}"
        print(f"{name:<24}{cfg:<21}{rate:>11,.0f}{rate / base_rate:>9.1f}x{tail}")
    frac_io, frac_traffic = best_rate * io_bytes / bw, best_rate * traffic / bw
    print(f"best engine configuration: {best_cfg}; memory bandwidth at its rate: I/O {io_bytes / 1e3:.1f} kB/sample"
          f" -> {100 * frac_io:.2f}% of {bw / 1e9:.1f} GB/s; traffic ~{traffic / 1e3:.0f} kB/sample -> {100 * frac_traffic:.1f}%")
    results.update({
        "throughput_ratio": best_rate / base_rate, "engine_samples_per_s": best_rate,
        "vmap_dense_samples_per_s": base_rate, "overlap_top32_gaussian": q_g[0],
        "sqnorm_rel_error_gaussian": q_g[1], "overlap_gap": q_g[0] - results["overlap_top32_sketch"],
        "bandwidth_fraction_io": frac_io, "bandwidth_fraction_traffic": frac_traffic,
    })
    return results


def ft1(args, bw):
    head, _, _, X, y = setup_ft1(args.n)
    with torch.no_grad():
        Z = head(torch.from_numpy(X)).double()
    D = torch.softmax(Z, 1)
    D[torch.arange(len(y)), torch.from_numpy(y)] -= 1
    Xt = torch.cat([torch.from_numpy(X).double(), torch.ones(len(X), 1, dtype=torch.float64)], 1)
    exact_sq = ((D**2).sum(1) * (Xt**2).sum(1)).numpy()

    def exact_top():
        gram = (D @ D.T) * (Xt @ Xt.T)  # the exact gradient Gram, N x N
        return top_eigvecs(lambda V: gram @ V, len(X), 32)

    io = X.shape[1] * 4 + 8 + args.m * 4
    return run_table("ft1", "FT-1 head 512+1 -> 196", args, bw, exact_top, exact_sq, io, ["tensorsketch"])


def ft2(args, bw):
    model, layers, _, X, y = setup_ft2(args.n)
    exact = GradientSketcher(model, 8, layers=layers, label_mode="true", model_id="ft2")
    G = torch.cat([exact.gradients(X[s : s + 2048], labels=y[s : s + 2048]) for s in range(0, len(X), 2048)]).double()
    exact_sq = (G**2).sum(1).numpy()

    def exact_top():
        gram = G @ G.T
        return top_eigvecs(lambda V: gram @ V, len(X), 32)

    io = X[0].size * 4 + 8 + args.m * 4
    return run_table("ft2", "FT-2 conv3x3(32->32) + linear(32->10)", args, bw, exact_top, exact_sq, io,
                     ["countsketch", "tensorsketch"])


RSS_CHILD = r"""
import json, sys, numpy as np, torch
sys.path.insert(0, {root!r})
from benchmarks.sketch_throughput import ft1_data, ft1_head
from skmm_pipeline.core.sketch_engine import GradientSketcher
torch.set_num_threads({threads})
N, m, B = {n}, {m}, 4096
X0, y0, centers, mix = ft1_data(4096)
head = ft1_head(X0, y0)
def batches():
    for s in range(0, N, B):
        rng = np.random.default_rng(s)
        b = min(B, N - s)
        y = rng.integers(0, 196, b)
        X = np.maximum(0, centers[y] @ mix + 0.35 * rng.normal(size=(b, 512)) + 0.2).astype(np.float32)
        yield X, y, None
def status(key):  # VmHWM/VmRSS of this process (ru_maxrss would include the parent's image before exec)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
sk = GradientSketcher(head, m, kind="tensorsketch", label_mode="true", model_id="rss")
before = status("VmRSS")
out = np.empty((N, m), dtype=np.float32)
s = 0
for rows in sk.sketch_stream(batches()):
    out[s : s + len(rows)] = rows
    s += len(rows)
print(json.dumps({{"peak": status("VmHWM"), "before": before, "out": out.nbytes, "rows": s}}))
"""


def peak_rss(n: int, m: int, threads: int) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = RSS_CHILD.format(root=root, threads=threads, n=n, m=m)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--baseline-n", type=int, default=2000, help="samples the vmap + dense baseline is timed on")
    ap.add_argument("--threads", type=int, default=2, help="cores to use: torch threads, or shard processes")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of the engine (best taken); the baseline gets 2")
    ap.add_argument("--quality-seeds", type=int, default=3)
    ap.add_argument("--rss-n", default="10000,100000")
    ap.add_argument("--parts", default="ft1,ft2,rss", help="which tables to produce")
    ap.add_argument("--quick", action="store_true", help="a smoke run in seconds: N = 256, m = 64, one repeat, FT-1 and one peak-RSS size")
    args = ap.parse_args()
    if args.quick:
        args.n, args.m, args.baseline_n, args.repeats, args.quality_seeds, args.rss_n, args.parts = (
            256, 64, 32, 1, 1, "2000", "ft1,rss")
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    t0 = time.perf_counter()
    bw = memory_bandwidth()
    print(f"machine: {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}, torch threads "
          f"{torch.get_num_threads()}, copy bandwidth {bw / 1e9:.1f} GB/s")
    res = {}
    if "ft1" in parts:
        res["ft1"] = ft1(args, bw)
    if "ft2" in parts:
        res["ft2"] = ft2(args, bw)
    rss = {}
    if "rss" in parts:
        print(f"\npeak RSS of a fresh process sketching FT-1 (TensorSketch, m = {args.m}), inputs generated batch by batch:")
        print(f"{'N':>8}{'before MB':>11}{'peak RSS MB':>13}{'output MB':>11}{'peak - output MB':>18}")
        for n in [int(v) for v in args.rss_n.split(",")]:
            r = rss[n] = peak_rss(n, args.m, args.threads)
            print(f"{n:>8,}{r['before'] / 1e6:>11.0f}{r['peak'] / 1e6:>13.0f}{r['out'] / 1e6:>11.0f}"
                  f"{(r['peak'] - r['out']) / 1e6:>18.0f}")
    print(f"\nseconds: {time.perf_counter() - t0:.0f}, load average at the end {os.getloadavg()[0]:.1f}\n")
    for prefix, r in res.items():
        for k, v in r.items():
            print(f"{prefix}_{k}: {v:.4g}" if not isinstance(v, str) else f"{prefix}_{k}: {v}")
    for n, r in rss.items():
        print(f"peak_rss_mb_n{n}: {r['peak'] / 1e6:.0f}")
        print(f"peak_rss_minus_output_mb_n{n}: {(r['peak'] - r['out']) / 1e6:.0f}")
    if "ft1" in res:
        print(f"ft1_throughput_ratio: {res['ft1']['throughput_ratio']:.0f}")


if __name__ == "__main__":
    main()
