"""What a sketched class space costs in fidelity and in selection quality, against what it saves.

Label-free FT-2 (``label_mode="expected"``) takes a deep block's gradient along K - 1 class-space
directions per sample; with ``class_probes = r < K - 1`` it takes it along r seeded random combinations
of them (``core.gradients.class_probes``), r backward probes instead of K - 1. Three parts:

* ``speed``: samples/s of the FT-2 ``expected`` sketch for each r on a ResNet-18 with 100 classes (32 px
  and 224 px, random weights, synthetic images), as a ratio to the exact class space and to the
  forward pass measured in the same run (channels_last, no grad).
* ``fidelity``: on the 32 px ResNet-18 (the last conv's output is 1 x 1, so the exact N x N Gram of the
  unsketched gradients is cheap from the factors), the relative Frobenius error of the Gram the rows
  give, and the share of the exact Gram's top-k energy that the rows' top-k eigenvectors capture
  (1 = the same subspace). Each r is shown without the m-sketch (the class-space sketch alone) and
  with it (what the pipeline stores), next to the exact class space with the m-sketch: the error the
  product already accepts. Deep block alone, and both blocks balanced as the pipeline does; with a
  random head, a simplex head (what trained classifiers tend to) and a rank-4 head (a class space of
  4 directions, the hard case).
* ``selection``: the embedded digits transfer (5 classes, so r = 4 is exact and r = 2, 1 are harsher
  compressions than 16 of 99), SkMM on the FT-2 ``expected`` sketch for each r and uniform, FT-1 test
  accuracy over seeds, paired difference to the exact class space.

    python benchmarks/class_probes.py [--quick] [--parts speed,fidelity,selection] [--seeds 5]
        [--markdown docs/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision

from skmm_pipeline import evaluation as cmp
from skmm_pipeline.core.gradients import GradientFactorizer
from skmm_pipeline.core.sketch_engine import GradientSketcher, calibrate_block_scales
from skmm_pipeline.data.digits import load_digits_transfer
from skmm_pipeline.models.features import standardized_features
from skmm_pipeline.models.small_cnn import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from composable import md_table as md  # noqa: E402 - scripts beside this one
from sketch_throughput import best_time  # noqa: E402

PARTS = ("speed", "fidelity", "selection")
EXACT = "exact"


HEADS = ("random", "simplex", "rank 4")


def resnet(seed: int = 0, head: str = "random") -> torch.nn.Module:
    """ResNet-18, 100 classes, random weights. ``head``: ``random``; ``simplex``, class vectors forming
    a centred simplex (the equiangular frame trained classifiers tend to); ``rank 4``, classes that are
    mixtures of 4 prototypes, so the class space has 4 directions (the hard case for a class-space sketch)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=100).eval()
    W = model.fc.weight.data
    K, d = W.shape
    if head == "simplex":
        U = torch.linalg.qr(torch.randn(d, K))[0]
        new = (torch.eye(K) - 1.0 / K) @ U.T
    elif head == "rank 4":
        new = torch.randn(K, 4) @ torch.randn(4, d)
    else:
        return model
    W.copy_(new * W.norm() / new.norm())
    return model


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(seed))


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: kernels chosen, operators built
    return best_time(fn, repeats)


def speed(probes: list, sizes: dict, m: int, repeats: int) -> pd.DataFrame:
    rows = []
    for size, n in sizes.items():
        model, X = resnet(), images(n, size)
        fast = model.to(memory_format=torch.channels_last)
        Xc = X.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            forward = n / best_of(lambda: fast(Xc), repeats)
        exact_rate = None
        for r in [None, *probes]:
            sk = GradientSketcher(model, m, layers="ft2", label_mode="expected", class_probes=r, model_id="r18",
                                  device="cpu")
            rate = n / best_of(lambda: sk.sketch(X), repeats)
            exact_rate = exact_rate or rate
            rows.append({"px": size, "class_probes": r or EXACT, "samples/s": rate, "vs exact": rate / exact_rate,
                         "forward fraction": rate / forward, "forward samples/s": forward})
    return pd.DataFrame(rows)


def gram_of_factors(model, X, r, seed) -> dict[str, torch.Tensor]:
    """Exact Gram of each block's (unsketched) gradient rows; needs one output position per block."""
    f = GradientFactorizer(model, "ft2", "expected", seed=seed, class_probes=r)
    grams = {}
    for fb in f.factors(X):
        if fb.left.shape[1] != 1:
            raise SystemExit("the fidelity part needs a block with one output position (32 px ResNet-18)")
        L, R = fb.left[:, 0].double(), fb.right[:, 0].double()
        grams[fb.name] = (L @ L.T) * (R @ R.T)
    return grams


def subspace_capture(approx: torch.Tensor, exact: torch.Tensor, k: int) -> float:
    """tr(U_k^T G U_k) / (sum of G's top-k eigenvalues), U_k the top-k eigenvectors of the approximation."""
    _, vecs = torch.linalg.eigh(approx)
    U = vecs[:, -k:]
    return float(torch.trace(U.T @ exact @ U) / torch.linalg.eigvalsh(exact)[-k:].sum())


def fidelity(probes: list, n: int, ms: list, seeds: list, k: int, head: str) -> pd.DataFrame:
    model, X = resnet(head=head), images(n, 32, seed=1)
    with torch.no_grad():
        exact = gram_of_factors(model, X, None, 0)
    names = list(exact)
    energy = {b: float(torch.diagonal(g).mean()) for b, g in exact.items()}
    scale2 = {b: sum(energy.values()) / (len(energy) * e) for b, e in energy.items()}  # balanced blocks
    reference = {"deep block": exact[names[0]], "both blocks": sum(scale2[b] * exact[b] for b in names)}
    deep_only = dict(layers=[names[0]])  # the head left out: the deep block's rows alone
    both = dict(layers="ft2", block_scales={b: float(np.sqrt(scale2[b])) for b in names})
    rows = []
    for seed in seeds:
        for r in [None, *probes]:
            for m in [None, *ms]:
                if m is None and r is None:
                    continue
                if m is None:  # the class-space sketch alone
                    grams = gram_of_factors(model, X, r, seed)
                    approx = {"deep block": grams[names[0]], "both blocks": sum(scale2[b] * grams[b] for b in names)}
                else:
                    approx = {}
                    for what, kw in (("deep block", deep_only), ("both blocks", both)):
                        sk = GradientSketcher(model, m, label_mode="expected", class_probes=r, seed=seed,
                                              model_id="r18", device="cpu", **kw)
                        Y = torch.as_tensor(sk.sketch(X)).double()
                        approx[what] = Y @ Y.T
                for what, G in approx.items():
                    ref = reference[what]
                    c = float((G * ref).sum() / (G * G).sum())  # the best scalar: moment matching ignores scale
                    rows.append({"head": head, "gram": what, "class_probes": r or EXACT, "m": m or "none (exact rows)",
                                 "seed": seed, "rel. error": float((G - ref).norm() / ref.norm()),
                                 "error up to scale": float((c * G - ref).norm() / ref.norm()),
                                 f"top-{k} capture": subspace_capture(G, ref, k)})
    df = pd.DataFrame(rows)
    keys = ["head", "gram", "m", "class_probes"]
    out = df.groupby(keys, sort=False).agg(**{
        "rel. error mean": ("rel. error", "mean"), "rel. error max": ("rel. error", "max"),
        "up to scale mean": ("error up to scale", "mean"), "up to scale max": ("error up to scale", "max"),
        f"top-{k} capture mean": (f"top-{k} capture", "mean"), f"top-{k} capture min": (f"top-{k} capture", "min")})
    return out.reset_index()


def selection(probes: list, seeds: list, budgets: list, m: int, epochs: int) -> pd.DataFrame:
    data = load_digits_transfer()
    model = pretrain(data.source_train.images, data.source_train.labels, data.num_classes, epochs=epochs, seed=0)
    pool_f, (val_f, test_f) = standardized_features(model, data.pool.images, [data.val.images, data.test.images])
    pool = cmp.Split.of("pool", pool_f, data.pool.labels, data.pool.images)
    val = cmp.Split.of("val", val_f, data.val.labels, data.val.images)
    test = cmp.Split.of("test", test_f, data.test.labels, data.test.images)
    frames = []
    for r in [None, *probes]:
        kw = dict(layers="ft2", label_mode="expected", class_probes=r, device="cpu")
        scales = calibrate_block_scales(model, data.val.images, **kw)
        sketches = cmp.SeededSketches(model, data.pool.images, sketch_dim=m, block_scales=scales, **kw)
        specs = cmp.default_specs(["skmm"] if r else ["skmm", "uniform"], class_balanced=False)
        df = cmp.compare(pool, val, test, specs, budgets, seeds, sketch=sketches, threads=1)
        df.loc[df.method == "skmm", "method"] = f"skmm, class_probes {r or EXACT}"
        frames.append(df)
    df = pd.concat(frames)
    df = df[df.status == "ok"]
    wide = df.pivot_table(index=["n", "seed"], columns="method", values="test_accuracy")
    base = f"skmm, class_probes {EXACT}"
    rows = []
    for n, g in wide.groupby(level="n"):
        for method in wide.columns:
            d = g[method] - g[base]
            sem = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
            rows.append({"n": n, "method": method, "accuracy %": 100 * g[method].mean(),
                         "s.e.m.": 100 * g[method].std(ddof=1) / np.sqrt(len(g)),
                         "vs exact (paired, points)": 100 * d.mean(), "z": d.mean() / sem if sem else 0.0})
    return pd.DataFrame(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: small sizes, one seed")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--markdown", default="", help="also write the tables to DIR/class_probes.md")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    q = args.quick
    seeds = list(range(1 if q else args.seeds))
    out = [f"# Sketched class space ({'quick' if q else 'full'} run, {torch.get_num_threads()} CPU threads)\n"]
    if "speed" in parts:
        sizes = {32: 64} if q else {32: 512, 224: 64}
        table = speed([16] if q else [64, 32, 16, 8], sizes, 256, 1 if q else 2)
        out += ["## Speed, FT-2 `expected`, ResNet-18 with 100 classes, m = 256\n", md(table), ""]
    if "fidelity" in parts:
        k = 8 if q else 32
        args_ = ([16] if q else [64, 32, 16, 8], 64 if q else 512, [256] if q else [256, 1024], [0] if q else list(range(8)), k)
        table = pd.concat([fidelity(*args_, head=h) for h in HEADS])
        out += [f"## Fidelity, 32 px ResNet-18 with 100 classes, N = {64 if q else 512}, over {1 if q else 8} seeds\n",
                md(table), ""]
    if "selection" in parts:
        table = selection([2] if q else [2, 1], seeds, [20] if q else [20, 40, 80], 128, 3 if q else 40)
        out += [f"## Selection, digits transfer, FT-2 `expected` sketch, FT-1 accuracy, {len(seeds)} seeds\n",
                md(table), ""]
    text = "\n".join(out)
    print(text)
    print(f"seconds: {time.perf_counter() - t0:.0f}")
    if args.markdown:
        path = Path(args.markdown) / "class_probes.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
