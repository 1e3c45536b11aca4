"""``diffattr`` command line: each subcommand parses its flags and calls one library function."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .baselines import method_names
from .config import AttributionConfig, AuditConfig, GradientConfig, ScoringConfig, flag_name
from .errors import DiffattrError


def _add_config_flags(parser: argparse.ArgumentParser, config_class) -> None:
    group = parser.add_argument_group(config_class.__name__, config_class.__doc__.splitlines()[0])
    for f in dataclasses.fields(config_class):
        flag = flag_name(f.name)
        group.add_argument(
            flag,
            dest=f.name,
            type=f.metadata["type"],
            default=f.default,
            help=f"{f.metadata['help']} (default: {f.default})",
        )


def _config_from(args: argparse.Namespace, config_class):
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="local diffusers pipeline or UNet folder")
    parser.add_argument("--scheduler", type=Path, help="scheduler folder, for a bare UNet folder --model")
    parser.add_argument(
        "--lora", type=Path, help="LoRA adapter folder (diffusers/peft format), fused into a text-to-image --model"
    )
    parser.add_argument("--train", required=True, type=Path, help="training image folder (imagefolder layout)")
    parser.add_argument("--run-dir", required=True, type=Path, help="where caches and results are stored")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, … (default: auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_flags(parser, ScoringConfig)


def _add_clip_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture, or a model-config JSON file")
    parser.add_argument("--clip-weights", type=Path, help="local open_clip checkpoint (.safetensors, .pt, .bin)")


def _clip(args):
    """The CLIP model when weights were given; nothing is ever downloaded."""
    if args.clip_weights is None:
        return None
    from .clip import ClipEmbedder
    from .models import resolve_device

    return ClipEmbedder(args.clip_model, args.clip_weights, device=resolve_device(args.device))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffattr", description="Which training images made this generated image?")
    commands = parser.add_subparsers(dest="command", required=True)

    cache = commands.add_parser(
        "cache",
        help="encode the training set and compute what every query needs: the baseline losses and, for the "
        "calibrated aggregation, the calibration (once per run directory)",
    )
    _add_common_flags(cache)
    _add_config_flags(cache, AttributionConfig)

    attribute = commands.add_parser("attribute", help="rank the training images by influence on query images")
    _add_common_flags(attribute)
    attribute.add_argument("--query", required=True, action="append", type=Path, help="query image (repeatable)")
    attribute.add_argument(
        "--label", action="append", type=int, help="class label of the queries (once for all, or once per --query)"
    )
    attribute.add_argument(
        "--prompt",
        action="append",
        help="prompt of the queries of a text-to-image model (once for all, or once per --query; "
        "default: the text of <query>.txt)",
    )
    attribute.add_argument("--top-k", type=int, default=10, help="training images to list per query (default: 10)")
    attribute.add_argument(
        "--candidates",
        type=int,
        metavar="M",
        help="score only the M training images nearest each query in the model's space, and their near duplicates "
        "(default: all)",
    )
    attribute.add_argument(
        "--method",
        default="forward-inf",
        choices=method_names(),
        help="forward-inf (default), or a baseline: pixel ℓ2, clip cosine, tracin, dtrak",
    )
    _add_clip_flags(attribute)
    _add_config_flags(attribute, AttributionConfig)
    _add_config_flags(attribute, GradientConfig)

    audit = commands.add_parser("audit", help="rank the training images by how memorized they look, with evidence")
    _add_common_flags(audit)
    audit.add_argument(
        "--leakage", type=Path, metavar="TEST_DIR", help="test image folder: which test images copy training images"
    )
    audit.add_argument(
        "--mislabeled", action="store_true", help="also rank training images by mislabel score (class-conditional)"
    )
    audit.add_argument("--top-k", type=int, default=10, help="images to print (report.json lists all; default: 10)")
    _add_config_flags(audit, AuditConfig)
    _add_config_flags(audit, AttributionConfig)

    demo = commands.add_parser("demo", help="offline demo: bundled toy model and digits → attributions")
    demo.add_argument("--out", type=Path, default=Path("diffattr-demo"), help="output folder (default: diffattr-demo)")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    gallery = commands.add_parser("gallery", help="static HTML pages of a run directory's attributions and audit")
    gallery.add_argument("--run-dir", required=True, type=Path, help="a run directory of `diffattr attribute`")
    gallery.add_argument("--out", type=Path, help="output folder (default: <run-dir>/gallery)")
    gallery.add_argument("--top-k", type=int, help="training images per query (default: all in result.json)")
    gallery.add_argument("--train", type=Path, help="training image folder (default: the one in config.json)")
    _add_clip_flags(gallery)
    gallery.add_argument("--device", default="auto", help="where CLIP runs: cpu, cuda, … (default: auto)")
    gallery.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _attributor(args, **extra):
    from .attributor import Attributor

    return Attributor(
        args.model,
        args.train,
        args.run_dir,
        scoring=_config_from(args, ScoringConfig),
        scheduler=args.scheduler,
        lora=args.lora,
        device=args.device,
        progress=not args.quiet,
        **extra,
    )


def _one_for_all(values: list | None):
    """A repeatable flag given once applies to every query; given per query, it stays a list."""
    return values[0] if values and len(values) == 1 else values


def _say(text: str) -> None:
    """Prints a result once: on rank 0 when launched on several processes."""
    from .distributed import is_main

    if is_main():
        print(text)


def run(args: argparse.Namespace) -> None:
    if args.command == "cache":
        attributor = _attributor(args, attribution=_config_from(args, AttributionConfig))
        baseline = attributor.cache()
        _say(f"baseline {tuple(baseline.shape)} (images × timesteps) in {attributor.run.path}")
    elif args.command == "attribute":
        attributor = _attributor(
            args,
            attribution=_config_from(args, AttributionConfig),
            gradient=_config_from(args, GradientConfig),
            clip=_clip(args),
        )
        results = attributor.attribute(
            args.query,
            labels=_one_for_all(args.label),
            prompts=_one_for_all(args.prompt),
            top_k=args.top_k,
            method=args.method,
            candidates=args.candidates,
        )
        for result in results:
            _say(result.table())
        _say(f"\nresults in {attributor.run.path / 'queries'}")
    elif args.command == "audit":
        attributor = _attributor(args, attribution=_config_from(args, AttributionConfig))
        report = attributor.audit(_config_from(args, AuditConfig), leakage=args.leakage, mislabeled=args.mislabeled)
        _say(report.table(args.top_k))
    elif args.command == "gallery":
        from .gallery import write_gallery

        index = write_gallery(
            args.run_dir, args.out, top_k=args.top_k, train=args.train, clip=_clip(args), progress=not args.quiet
        )
        _say(f"gallery: {index}")
    elif args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, device=args.device, progress=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except DiffattrError as error:
        print(f"diffattr: error: {error}", file=sys.stderr)
        return 2
    return 0
