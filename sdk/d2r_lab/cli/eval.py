"""``d2r eval``: evaluate an experiment (what ``d2r build`` ships, a preset, a bundle's
configuration, or a variant of one stage) on a dataset folder; flags map onto
:class:`d2r_lab.evaluation.Experiment`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from d2r import verify
from d2r.errors import InputError

from ..evaluation import EVAL_KINDS, MAX_REGIONS, PRESETS, Experiment, experiment, experiment_of_bundle, parse_seeds, run, write_report


def experiment_from_args(args, seed: int) -> Experiment:
    """The command line's experiment: a preset or a bundle's configuration, then the flags
    given (a flag left out changes nothing). Flag values are checked here, once."""
    if args.config and args.preset:
        raise InputError("--config and --preset: give one of them")
    base = experiment_of_bundle(args.config) if args.config else None
    changes = dict(
        features=args.features, precision=args.precision, backend=args.backend, codebook=args.codebook, codebook_size=args.codebook_size,
        kind=args.kind, pooling=args.pooling, regions=args.regions, region_mode=None, max_regions=args.max_regions,
        verify_top=100 if args.verify else None, verify_words=args.verify_words, verify_precision=args.verify_precision,
        max_features=args.max_features, scales=args.scales, score_threshold=args.score_threshold, fit=args.fit, seed=seed,
        expand=args.expand,
    )
    changes.pop("region_mode")
    if args.codebook:
        changes["codebook_size"] = None
    try:
        return experiment(args.preset if base is None else None, base=base, **changes)
    except InputError as exc:  # name the flag: "max_regions: ..." -> "--max-regions: ..."
        field_name, sep, rest = str(exc).partition(": ")
        flag = {"verification_words": "verify-words", "feature_fit": "fit", "feature_source": "features", "region_source": "regions",
                "verify_top": "verify"}.get(field_name, field_name.replace("_", "-"))
        if sep and " " not in field_name:
            raise InputError(f"--{flag}: {rest}") from exc
        raise


def run_cli(args) -> int:
    seeds = parse_seeds(args.seed)
    if len(seeds) > 1 and args.codebook:
        raise InputError("--seed: several seeds need a codebook trained here (--codebook-size), not --codebook")
    if len(seeds) > 1 and args.report:
        raise InputError("--report: one seed at a time")
    results = []
    for seed in seeds:
        exp = experiment_from_args(args, seed)
        res = run(args.dataset, exp, limit=args.limit, cache_dir=args.cache, threads=args.threads, progress=not args.quiet)
        o = res["options"]
        print(f"{res['dataset']}: {res['n_queries']} queries, {res['n_images']} images; {o['features']} {o['precision']} {o['backend']} "
              f"({o['max_features']} features, scales {','.join(f'{v:g}' for v in o['scales'])}, threshold {o['score_threshold']:g}), "
              f"{o['kind']} ({o['pooling']}), regions {o['regions']} ({res['regions_per_image']:.1f}/image), K={o['codebook_size']}, "
              f"seed {seed}, verify {o['verify']}")
        print(res["table"])
        print(f"index {res['index_bytes_per_image'] / 1024:.1f} KiB/image; query {res['timings']['query_ms_median']:.1f} ms (aggregation + search)")
        results.append(res)
    public = [{k: v for k, v in r.items() if k != "table" and not k.startswith("_")} for r in results]
    if len(seeds) > 1:
        mean = {p: float(np.mean([r["map"][p] for r in results])) for p in ("easy", "medium", "hard")}
        std = {p: float(np.std([r["map"][p] for r in results])) for p in ("easy", "medium", "hard")}
        print(f"mean over seeds {','.join(map(str, seeds))}: mAP " + ", ".join(f"{p} {mean[p]:.2f} (std {std[p]:.2f})" for p in mean))
    if args.json:
        doc = public[0] if len(seeds) == 1 else {"seeds": seeds, "map_mean": mean, "map_std": std, "runs": public}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if args.report:
        write_report(results[0], args.report)
        print(f"report: {args.report}")
    return 0


def _codebook_size(value: str):
    if value == "auto":
        return value
    from d2r.cli._types import positive_int

    return positive_int(value)


def register(sub) -> None:
    e = sub.add_parser("eval", help="evaluate the pipeline (what d2r build ships, or a preset or variant) on a dataset folder "
                                    "(gnd.json, db/, queries/)")
    e.add_argument("--dataset", required=True, help="folder in the roxford5k-mini layout")
    e.add_argument("--preset", choices=list(PRESETS),
                   help="start from a named baseline instead of the default pipeline (default: what `d2r build` ships)")
    e.add_argument("--config", metavar="BUNDLE", help="start from a bundle's pipeline configuration (its bundle.json) and codebook size")
    e.add_argument("--features", help="a local-feature model of the manifest (aliked_t16: the default, xfeat, aliked_n16) or a lab "
                                      "source: rootsift, aliked (torch)")
    e.add_argument("--max-features", type=int, help="keep the N best features per image (default: the model's or source's)")
    e.add_argument("--scales", help="image pyramid, comma-separated, e.g. 0.5,0.707,1,1.414 (model sources; >1 runs in tiles)")
    e.add_argument("--score-threshold", type=float, help="minimum keypoint score (default: the model's or source's)")
    e.add_argument("--fit", choices=["canvas", "longest"], help="feature models: scale 1 fits the image into the model input (canvas, "
                   "default) or sets its longest side to the input's (longest: portrait photos at full resolution, in tiles)")
    e.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="model files to prefer (default int8, as d2r build)")
    e.add_argument("--backend", choices=["tflite", "onnx"])
    g = e.add_mutually_exclusive_group()
    g.add_argument("--codebook", help="codebook file trained elsewhere")
    g.add_argument("--codebook-size", type=_codebook_size,
                   help="train a codebook of K words on the database (default auto, as d2r build: 8192, fewer for small databases)")
    e.add_argument("--kind", choices=list(EVAL_KINDS), help="aggregation (default rasmk_star, as d2r build)")
    e.add_argument("--pooling", choices=["max", "avg"], help="regional search (d2r_asmk_star): max or mean over regions")
    e.add_argument("--regions", help="none | detector:NAME@THRESH (default detector:landmark@0.1, as d2r build) | rmac:L | "
                                     "shuffled:NAME@THRESH (control: another image's boxes) | centred:NAME@THRESH (control: its own boxes moved to "
                                     "the centre); or how boxes get features: crop | pack | pool")
    e.add_argument("--max-regions", type=int, help=f"detector regions: the best N boxes above the threshold per image (default 8, as "
                                                   f"d2r build; at most {MAX_REGIONS})")
    e.add_argument("--expand", type=int, help="query expansion with the N best hits (default 3, as d2r query; 0: off)")
    e.add_argument("--verify", action="store_true", help="spatial verification of the top 100")
    e.add_argument("--verify-words", type=int, metavar="M",
                   help="verification matches a query feature only with features of its M nearest visual words (default 0: exhaustive; faster, loses inliers)")
    e.add_argument("--verify-precision", choices=list(verify.PRECISIONS),
                   help="exhaustive matching of verification: int8 codes (default, integer GEMM) or fp32")
    e.add_argument("--limit", type=int, help="only the first N queries (quick runs)")
    e.add_argument("--cache", help="feature cache folder (default ~/.cache/d2r/eval)")
    e.add_argument("--seed", default="0", help="codebook seed, or several comma-separated (each run is printed, then the mean)")
    e.add_argument("--threads", type=int)
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--json", help="write every number to this JSON file")
    e.add_argument("--report", help="write an HTML page: per-query ranked thumbnails and the summary table")
    e.set_defaults(func=run_cli)
