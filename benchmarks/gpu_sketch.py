"""What users get from gradient sketching on a device: the engine against the forward pass it needs,
against research code (vmap + dense projection), and from shard files on disk to sketch files.

Everything is measured in one run on one device (``--device``: cuda when present, else the CPU), on
synthetic images, with torchvision ResNet-18s (random weights, a 100-class head) at 32 and 224 px and
the embedded small CNN (8x8 digits, 5 classes). Each rate is samples per second, the best of
``--repeats`` timed passes after a warm-up pass; the device is synchronised around every pass.

- forward: the model alone under ``no_grad`` (batches of ``--forward-batch``), fp32 / bf16 autocast,
  each in NCHW and channels_last layout; "best forward" is the fastest of these.
- engine: ``GradientSketcher`` (m = ``--m``, default kind) for FT-1 (the head) and FT-2 (the last conv
  + the head), label modes ``expected`` (the pipeline's default, label-free: with 100 classes FT-2
  takes the default ``class_probes`` = 16 class-space directions; "expected, all classes" is the exact
  class space, 99 directions) and ``true``, fp32 and (on CUDA) bf16 autocast, inputs already on the
  device, rows copied back to host memory.
  **forward fraction** = engine / best forward: 1.0 means sketching costs no more than inference.
- vmap + dense: ``torch.func.vmap(grad)`` per-sample gradients of cross-entropy with true labels (the
  same quantity as the engine's ``true`` mode), fp32, times a dense Gaussian map held on the device
  (drawing it is not timed); ``vs vmap`` = engine ``true`` (best precision) / this.
- end to end: shard files (uncompressed ``.npz``, written first, so the page cache is warm; 8-bit
  pixels with the ImageNet decode, as imports write them, and float32 for FT-1) opened by ``read_shard`` (memory-mapped; the pixels were verified when the shard landed), fed by
  the ``data.loader`` DataLoader (pinned memory, worker processes on CUDA) to the engine, rows
  streamed into ``SketchShardWriter`` files: what the ``gradient_sketch`` asset runs per shard. Reported against the engine alone and the best forward.
- checks (CUDA): rows against the CPU's, bit-identity across staging batch sizes, rows across block
  sizes, out-of-memory back-off under a per-process memory cap, labels given as a CUDA tensor.

    python benchmarks/gpu_sketch.py [--quick] [--json] [--device auto|cpu|cuda] [--m M]

``--json`` prints one JSON object as the last line (keys ``ft1_forward_fraction_224``,
``ft2_forward_fraction_224``, ``ft1_vs_vmap_224``, ``ft2_vs_vmap_224``, ``e2e_forward_fraction_224``,
``device`` and every measured rate). ``--table OUT...`` runs nothing and prints the docs' 224 px table from
saved outputs (``docs/results/gpu_sketch_224.md``)::

    python benchmarks/gpu_sketch.py --table docs/results/gpu_sketch_h200_quick.txt \
        docs/results/gpu_sketch_cpu_quick.txt > docs/results/gpu_sketch_224.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from skmm_pipeline.core import defaults
from skmm_pipeline.core.gradients import layer_param_names, vmap_gradients
from skmm_pipeline.core.sketch_engine import GradientSketcher, resolve_device
from skmm_pipeline.core.sketch_io import SketchShardWriter
from skmm_pipeline.data.loader import sketch_shard
from skmm_pipeline.data.shards import read_shard, write_shard
from skmm_pipeline.data.vision import ImageTransform
from skmm_pipeline.models.small_cnn import SmallCNN

MODELS = {  # name -> (model factory, input shape, classes)
    "small_cnn": (lambda: SmallCNN(num_classes=5), (1, 8, 8), 5),
    "resnet18_32": (lambda: torchvision.models.resnet18(num_classes=100), (3, 32, 32), 100),
    "resnet18_224": (lambda: torchvision.models.resnet18(num_classes=100), (3, 224, 224), 100),
}
# Samples per timed pass: (engine and forward, vmap baseline, end to end), by device type and --quick.
SIZES = {
    ("cuda", False): {"small_cnn": (262144, 16384, 0), "resnet18_32": (65536, 8192, 0), "resnet18_224": (16384, 2048, 16384)},
    ("cuda", True): {"small_cnn": (65536, 8192, 0), "resnet18_32": (16384, 2048, 0), "resnet18_224": (4096, 1024, 8192)},
    ("cpu", False): {"small_cnn": (16384, 2048, 0), "resnet18_32": (1024, 128, 0), "resnet18_224": (128, 32, 256)},
    ("cpu", True): {"small_cnn": (4096, 512, 0), "resnet18_32": (256, 64, 0), "resnet18_224": (64, 16, 128)},
}
SHARD_ROWS = {"cuda": 2048, "cpu": 64}  # rows per shard file in the end-to-end run


class Clock:
    """Best-of-n wall time of a function, the device synchronised around it; peak device memory."""

    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def best(self, fn) -> tuple[float, float | None]:
        fn()  # warm-up: kernels chosen, tables built, block size measured
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
        best = float("inf")
        for _ in range(self.repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        return best, peak


def autocast(device, precision):
    if precision == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precisions(device) -> list[str]:
    return ["float32", "bfloat16"] if device.type == "cuda" else ["float32"]


def data(name: str, n: int, device, seed: int = 0):
    _, shape, K = MODELS[name]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn((n, *shape), generator=gen).to(device)
    y = torch.randint(0, K, (n,), generator=gen).to(device)
    return X, y


def model_for(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0]().eval()


def forward_rates(name, X, clock, batch) -> dict[str, tuple[float, float | None]]:
    out = {}
    for precision in precisions(clock.device):
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            model = model_for(name).to(clock.device, memory_format=fmt)
            Xf = X.contiguous(memory_format=fmt)

            def run():
                with torch.no_grad(), autocast(clock.device, precision):
                    for s in range(0, len(Xf), batch):
                        model(Xf[s : s + batch])

            t, peak = clock.best(run)
            out[f"{precision}/{layout}"] = (len(X) / t, peak)
    return out


def engine_rate(name, X, y, clock, m, layers, mode, precision, **kwargs):
    sk = GradientSketcher(model_for(name), m, layers=layers, label_mode=mode, precision=precision,
                          device=clock.device, model_id=name, **kwargs)
    out = np.empty((len(X), m), dtype=np.float32)
    labels = y if mode == "true" else None
    t, peak = clock.best(lambda: sk.sketch(X, labels=labels, batch_size=len(X), out=out))
    return len(X) / t, peak, sk.block_rows


def vmap_rate(name, X, y, clock, m, layers, batch):
    model = model_for(name).to(clock.device)
    params = layer_param_names(model, layers)
    r = sum(dict(model.named_parameters())[p].numel() for p in params)
    gen = torch.Generator(device=clock.device).manual_seed(1)
    gamma = torch.randn(r, m, generator=gen, device=clock.device) / m**0.5
    loss = lambda out, t: nn.functional.cross_entropy(out[None], t[None])  # noqa: E731

    def run():
        for s in range(0, len(X), batch):
            G = vmap_gradients(model, X[s : s + batch], loss, y[s : s + batch], params)
            (G @ gamma).cpu()

    t, peak = clock.best(run)
    return len(X) / t, peak


def end_to_end(name, n, clock, m, layers, precision, shard_rows, workers, pixels="uint8"):
    """Shard files -> sketch files, as the gradient_sketch asset does it; (rate, read-and-check seconds).
    ``pixels``: the shards hold 8-bit pixels with the ImageNet decode (what imports write) or float32."""
    _, shape, _ = MODELS[name]
    rng = np.random.default_rng(0)
    decode = ImageTransform.imagenet().decode() if shape[0] == 3 else None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = []
        for i, s in enumerate(range(0, n, shard_rows)):
            k = min(shard_rows, n - s)
            paths.append(tmp / f"shard{i:03d}.npz")
            if pixels == "uint8":
                u8 = rng.integers(0, 256, size=(k, *shape), dtype=np.uint8)
                write_shard(paths[-1], u8, rng.integers(0, 100, k), pixel_scale=decode.scale, pixel_offset=decode.offset)
            else:
                write_shard(paths[-1], rng.standard_normal((k, *shape), dtype=np.float32), rng.integers(0, 100, k))
        sk = GradientSketcher(model_for(name), m, layers=layers, precision=precision, device=clock.device, model_id=name)
        read_s = [0.0]

        def run():
            read_s[0] = 0.0
            for p in paths:
                t0 = time.perf_counter()
                shard = read_shard(p, verify=False)  # as gradient_sketch reads a shard raw_shard verified
                read_s[0] += time.perf_counter() - t0
                with SketchShardWriter(tmp / "sketch" / shard.name, sk.prepare(shard.images).identity, shard.ids, m) as w:
                    sketch_shard(sk, shard, w.rows, batch_size=512, workers=workers)

        t, peak = clock.best(run)
    return n / t, read_s[0], peak


def checks(clock, m) -> list[tuple[str, str]]:
    """Correctness on the device (CUDA only): (check, result) rows."""
    dev = clock.device
    X, y = data("resnet18_32", 256, "cpu", seed=3)
    rows = []
    for layers in ("ft1", "ft2"):
        cpu = GradientSketcher(model_for("resnet18_32"), m, layers=layers, device="cpu", block_rows=64).sketch(X)
        gpu = GradientSketcher(model_for("resnet18_32"), m, layers=layers, device=dev, block_rows=64).sketch(X)
        rel = float(np.abs(gpu - cpu).max() / np.abs(cpu).max())
        rows.append((f"{layers} expected: CUDA fp32 rows vs CPU (max abs diff / max abs)", f"{rel:.1e}"))
        staged = [GradientSketcher(model_for("resnet18_32"), m, layers=layers, device=dev, block_rows=64)
                  .sketch(X.to(dev) if b == 256 else X, batch_size=b) for b in (7, 100, 256)]
        rows.append((f"{layers}: rows bit-identical for staging batches 7 / 100 / 256 (numpy and device input)",
                     str(all(np.array_equal(staged[0], s) for s in staged))))
        big = GradientSketcher(model_for("resnet18_32"), m, layers=layers, device=dev, block_rows=256).sketch(X)
        rel = float(np.abs(big - gpu).max() / np.abs(gpu).max())
        rows.append((f"{layers}: block_rows 256 vs 64 (max abs diff / max abs)", f"{rel:.1e}"))
    lab_np = GradientSketcher(model_for("resnet18_32"), m, layers="ft2", label_mode="true", device=dev,
                              block_rows=64).sketch(X, labels=y.numpy())
    lab_t = GradientSketcher(model_for("resnet18_32"), m, layers="ft2", label_mode="true", device=dev,
                             block_rows=64).sketch(X, labels=y.to(dev))
    rows.append(("true labels as a CUDA tensor = as a numpy array", str(np.array_equal(lab_np, lab_t))))
    # 8-bit shards decode on the device: the rows equal those of the host-decoded images.
    with tempfile.TemporaryDirectory() as tmp:
        decode = ImageTransform.imagenet().decode()
        u8 = np.random.default_rng(5).integers(0, 256, size=(200, 3, 32, 32), dtype=np.uint8)
        write_shard(Path(tmp) / "eight.npz", u8, pixel_scale=decode.scale, pixel_offset=decode.offset)
        shard = read_shard(Path(tmp) / "eight.npz")
        kw = dict(layers="ft2", device=dev, block_rows=64)
        host = GradientSketcher(model_for("resnet18_32"), m, **kw).sketch(np.asarray(shard.images))
        on_dev = sketch_shard(GradientSketcher(model_for("resnet18_32"), m, **kw), shard, batch_size=64, workers=2)
        rows.append(("8-bit shard decoded on the device = host-decoded images", str(np.array_equal(host, on_dev))))
    # Out-of-memory back-off: a per-process cap far below the free memory the block size is sized from.
    Xb, _ = data("resnet18_224", 384, "cpu", seed=4)
    ref = GradientSketcher(model_for("resnet18_224"), m, layers="ft2", device=dev, block_rows=32).sketch(Xb)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    cap = (torch.cuda.memory_allocated(index) + (3 << 30)) / torch.cuda.get_device_properties(index).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap, index)
    try:
        sk = GradientSketcher(model_for("resnet18_224"), m, layers="ft2", device=dev, block_rows=4096)
        got = sk.sketch(Xb)
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        rows.append(("OOM back-off (3 GiB cap, FT-2 224 px, 4,096-row blocks asked)",
                     f"finished with blocks of {sk.block_rows} rows; rows vs 32-row blocks {rel:.1e}"))
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the table shows what failed
        rows.append(("OOM back-off (3 GiB cap)", f"FAILED: {type(exc).__name__}: {str(exc)[:200]}"))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        torch.cuda.empty_cache()
    return rows


def profile(clock, m, n: int) -> None:
    """The device kernels of the label-free FT-1 and FT-2 sketches at 224 px (bf16 on CUDA), by total time."""
    X, _ = data("resnet18_224", n, clock.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.device.type == "cuda" else [])
    for layers in ("ft1", "ft2"):
        sk = GradientSketcher(model_for("resnet18_224"), m, layers=layers, precision=precisions(clock.device)[-1],
                              device=clock.device, model_id="profile")
        sk.sketch(X)
        clock.sync()
        with torch_profile(activities=activities) as prof:
            sk.sketch(X)
            clock.sync()
        key = "cuda_time_total" if clock.device.type == "cuda" else "self_cpu_time_total"
        print(f"\nprofile: {layers.upper()} expected, 224 px, {n} samples, blocks of {sk.block_rows}\n")
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))


def table(title, header, rows):
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def fmt_rate(r: float) -> str:
    return f"{r:,.0f}"


def fmt_mem(p) -> str:
    return "—" if p is None else f"{p:,.0f}"


def run_model(name, size, dev, clock, m, result) -> None:
    n, n_vmap, n_e2e = size
    X, y = data(name, n, dev)
    tag = name.split("_")[-1] if name.startswith("resnet") else "small"
    fwd = forward_rates(name, X, clock, 1024 if dev.type == "cuda" else 64)
    best_fwd = max(r for r, _ in fwd.values())
    table(f"{name}: forward only, N = {n:,}", ["variant", "samples/s", "peak MiB"],
          [(k, fmt_rate(r), fmt_mem(p)) for k, (r, p) in fwd.items()])
    eng_rows, eng = [], {}
    for layers in ("ft1", "ft2"):
        vr, vpeak = vmap_rate(name, X[:n_vmap], y[:n_vmap], clock, m, layers, 256 if dev.type == "cuda" else 16)
        eng[(layers, "vmap")] = vr
        for mode in ("expected", "true"):
            for precision in precisions(dev):
                r, peak, rows_per_block = engine_rate(name, X, y, clock, m, layers, mode, precision)
                eng[(layers, mode, precision)] = r
                eng_rows.append((layers.upper(), mode, precision, fmt_rate(r), f"{r / best_fwd:.2f}",
                                 f"{r / vr:.1f}×" if mode == "true" else "", rows_per_block, fmt_mem(peak)))
        if layers == "ft2" and MODELS[name][2] - 1 > defaults.CLASS_PROBES:  # the exact class space, for reference
            p = precisions(dev)[-1]
            r, peak, rows_per_block = engine_rate(name, X, y, clock, m, layers, "expected", p, class_probes=None)
            eng[(layers, "expected-exact")] = r
            eng_rows.append((layers.upper(), "expected, all classes", p, fmt_rate(r), f"{r / best_fwd:.2f}", "",
                             rows_per_block, fmt_mem(peak)))
        eng_rows.append((layers.upper(), "vmap + dense (true)", "float32", fmt_rate(vr), f"{vr / best_fwd:.2f}",
                         "1.0×", "", fmt_mem(vpeak)))
    table(f"{name}: sketching, best forward {fmt_rate(best_fwd)} samples/s",
          ["params", "label mode", "precision", "samples/s", "forward fraction", "vs vmap", "block rows", "peak MiB"],
          eng_rows)
    result[f"forward_{tag}"] = best_fwd
    for layers in ("ft1", "ft2"):
        best_exp = max(eng[(layers, "expected", p)] for p in precisions(dev))
        best_true = max(eng[(layers, "true", p)] for p in precisions(dev))
        result[f"{layers}_{tag}"] = best_exp
        result[f"{layers}_true_{tag}"] = best_true
        result[f"{layers}_vmap_{tag}"] = eng[(layers, "vmap")]
        result[f"{layers}_forward_fraction_{tag}"] = round(best_exp / best_fwd, 3)
        result[f"{layers}_true_forward_fraction_{tag}"] = round(best_true / best_fwd, 3)
        result[f"{layers}_vs_vmap_{tag}"] = round(best_true / eng[(layers, "vmap")], 2)
        if (layers, "expected-exact") in eng:
            result[f"{layers}_all_classes_forward_fraction_{tag}"] = round(eng[(layers, "expected-exact")] / best_fwd, 3)
    if n_e2e:
        e2e_rows = []
        best_p = max(precisions(dev), key=lambda p: eng[("ft1", "expected", p)])
        for layers, pixels in (("ft1", "uint8"), ("ft1", "float32"), ("ft2", "uint8")):
            rate, read_s, peak = end_to_end(name, n_e2e, clock, m, layers, best_p, SHARD_ROWS[dev.type], None, pixels)
            engine = eng[(layers, "expected", best_p)]
            e2e_rows.append((layers.upper(), pixels, best_p, fmt_rate(rate), f"{rate / engine:.2f}",
                             f"{rate / best_fwd:.2f}", f"{read_s:.2f}", fmt_mem(peak)))
            key = layers if pixels == "uint8" else f"{layers}_float32"
            result[f"e2e_{key}_{tag}"] = rate
            result[f"e2e_{key}_forward_fraction_{tag}"] = round(rate / best_fwd, 3)
        result[f"e2e_forward_fraction_{tag}"] = result[f"e2e_ft1_forward_fraction_{tag}"]
        table(f"{name}: shard files to sketch files (label-free), N = {n_e2e:,}",
              ["params", "shard pixels", "precision", "samples/s", "of engine alone", "forward fraction", "open s",
               "peak MiB"], e2e_rows)



def ft2_classes(r: dict) -> str:
    """FT-2 `expected` takes 16 of the 99 class directions by default; runs saved before that setting took all."""
    if "ft2_all_classes_forward_fraction_224" in r:
        return f"; {r['ft2_all_classes_forward_fraction_224']:.2f} with all classes"
    return ", all classes (before `class_probes`)"


def shard_pixels(r: dict) -> str:
    """Shards hold 8-bit pixels since imports write them; runs saved before read float32 shards."""
    if "e2e_ft1_float32_forward_fraction_224" in r:
        return f", 8-bit; {r['e2e_ft1_float32_forward_fraction_224']:.2f} from float32 shards"
    return ", float32 shards (before 8-bit shards)"


def summary_table(outputs: list[str]) -> str:
    """The docs' 224 px table (Markdown), one row per saved ``--json`` run (its last line is the JSON)."""
    head = ["224 px, samples/s (forward fraction)", "forward, best", "FT-1 `expected`", "FT-1 `true` (vs vmap)",
            "FT-2 `expected`", "FT-2 `true` (vs vmap)", "shard files → sketch, FT-1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for path in outputs:
        r = json.loads(Path(path).read_text().strip().splitlines()[-1])

        def rate(key, frac=None, vmap=None):
            extra = [f"{r[frac]:.2f}"] if frac else []
            extra += [f"{r[vmap]:.1f}×"] if vmap else []
            return f"{r[key]:,.0f}" + (f" ({', '.join(extra)})" if extra else "")

        lines.append("| " + " | ".join([
            f"{r['device']}, m = {r['m']}", rate("forward_224"),
            rate("ft1_224", "ft1_forward_fraction_224"),
            rate("ft1_true_224", "ft1_true_forward_fraction_224", "ft1_vs_vmap_224"),
            rate("ft2_224", "ft2_forward_fraction_224") + ft2_classes(r),
            rate("ft2_true_224", "ft2_true_forward_fraction_224", "ft2_vs_vmap_224"),
            rate("e2e_ft1_224", "e2e_ft1_forward_fraction_224") + shard_pixels(r),
        ]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", nargs="+", metavar="OUTPUT", default=None,
                    help="run nothing: print the docs' Markdown table from saved --json outputs")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="fewer samples and one timed pass (a smoke run)")
    ap.add_argument("--json", action="store_true", help="print one JSON object of the results as the last line")
    ap.add_argument("--m", type=int, default=0, help="sketch dimension (default 1024 on CUDA, 256 on the CPU)")
    ap.add_argument("--repeats", type=int, default=0, help="timed passes (default 3, 1 with --quick)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="profile the 224 px sketches on N samples")
    args = ap.parse_args()
    if args.table:
        print(summary_table(args.table))
        return
    dev = resolve_device(args.device)
    m = args.m or (1024 if dev.type == "cuda" else 256)
    clock = Clock(dev, args.repeats or (1 if args.quick else 3))
    sizes = SIZES[(dev.type, args.quick)]
    name_of_device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name_of_device}; torch {torch.__version__}; m = {m}; best of {clock.repeats} pass(es)")
    result: dict = {"device": name_of_device, "m": m, "quick": args.quick}
    t_start = time.perf_counter()

    for name in args.models.split(","):
        try:
            run_model(name, sizes[name], dev, clock, m, result)
        except Exception:  # noqa: BLE001 - one model's failure must not hide the others' tables
            traceback.print_exc()
            result[f"failed_{name}"] = True
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if dev.type == "cuda" and not args.no_checks:
        try:
            rows = checks(clock, m)
            table("checks on the device", ["check", "result"], rows)
            result["checks"] = dict(rows)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    if args.profile:
        profile(clock, m, args.profile)
    print(f"\n{time.perf_counter() - t_start:.0f} s in all")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
