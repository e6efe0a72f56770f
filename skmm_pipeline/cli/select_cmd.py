"""``skmm select`` and ``skmm methods``: select rows of an array with any registered method."""

from __future__ import annotations

import json

import numpy as np

from skmm_pipeline.cli.files import ResultPaths, check_fits, read_npy
from skmm_pipeline.core.outliers import lacks_structure, spatial_structure
from skmm_pipeline.core.selection import DESCRIPTIONS, METHOD_INFO, as_selection_matrix, select
from skmm_pipeline.core.sketch import make_sketch
from skmm_pipeline.core.validation import InputError

SKETCH_CHUNK_ROWS = 4096


def run_methods(args) -> int:
    """Print every registered method with its group, its input and what it does."""
    width = max(map(len, METHOD_INFO))
    for name, info in METHOD_INFO.items():
        print(f"{name:<{width}}  {info['group']:<11}  {info['input']:<8}  {DESCRIPTIONS.get(name, '')}")
    return 0


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else f"<array shape {value.shape}>"
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def _parse_option(text: str):
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise InputError(f"--option expects KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.replace("-", "_"), value


def run(args) -> int:
    paths = ResultPaths.plan(args.output, (args.input, args.labels, args.images, args.reference), force=args.force)
    X = read_npy(args.input, "--input")
    input_shape = list(X.shape)
    labels = None if args.labels is None else np.asarray(read_npy(args.labels, "--labels", kinds="iu"))
    options = dict(_parse_option(o) for o in args.option)
    if args.class_balanced or args.class_budgets:
        options["class_balanced"] = True
    if args.class_budgets:
        options["class_budgets"] = args.class_budgets
    if args.outlier_guard:
        options["outlier_guard"] = True
    reference = None if args.reference is None else read_npy(args.reference, "--reference")
    if reference is not None and (reference.ndim != 2 or reference.shape[1] != X.shape[1]):
        raise InputError(f"--reference must be a .npy array of rows like --input's ({X.shape[1]} columns), "
                         f"got shape {reference.shape}")
    sketch_identity = None
    if args.sketch_dim is not None:
        X = as_selection_matrix(X, "input")  # finite, 2-D: fail with the row number before sketching
        # The N x m sketch, plus one 4,096-row block of the Gaussian map at a time.
        check_fits(4 * args.sketch_dim * (X.shape[0] + min(X.shape[1], SKETCH_CHUNK_ROWS)),
                   f"--sketch-dim {args.sketch_dim}")
        sk = make_sketch("gaussian", X.shape[1], args.sketch_dim, args.seed, args.sketch_name)
        X = sk.apply_rows(X, SKETCH_CHUNK_ROWS)
        if reference is not None:  # the same map: the reference's moment lives in the same sketch
            reference = sk.apply_rows(as_selection_matrix(reference, "reference"), SKETCH_CHUNK_ROWS)
        sketch_identity = sk.identity.as_dict()
    extra = {} if reference is None else {"reference": reference}
    if args.images:
        if not args.outlier_guard:
            raise InputError("--images is used by the input check of --outlier-guard; pass --outlier-guard too")
        images = read_npy(args.images, "--images")
        if images.ndim != 4 or images.shape[0] != input_shape[0]:
            raise InputError(f"--images must be a .npy array of {input_shape[0]} x C x H x W (one image per input "
                             f"row), got {images.shape}")
        extra["exclude"] = lacks_structure(spatial_structure(images))
    result = select(args.method, X, args.n, seed=args.seed, labels=labels, **options, **extra)
    record = {
        "method": result.method,
        "n": args.n,
        "seed": args.seed,
        "input": str(args.input),
        "input_shape": input_shape,
        "options": options,
        "images": None if args.images is None else str(args.images),
        "reference": None if args.reference is None else str(args.reference),
        "sketch": sketch_identity,
        **result.diagnostics,
    }
    paths.write(result.indices, _json_safe(record), result.weights)
    print(f"wrote {len(result.indices)} indices to {paths.indices} and diagnostics to {paths.diagnostics}")
    return 0
