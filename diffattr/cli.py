"""``diffattr`` command line: each subcommand parses its flags and calls one library function."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .baselines import method_names
from .config import (
    MAX_IMAGE_PIXELS,
    RETRIEVERS,
    AttributionConfig,
    AuditConfig,
    GradientConfig,
    ScoringConfig,
    flag_name,
)
from .errors import DiffattrError
from .names import name_problem

DEBUG_HELP = "on an unexpected error, show the Python traceback"


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


def path_argument(value: str) -> Path:
    """A path flag's value, refused by argparse (one line) when no file could have that name."""
    if "\0" in value:
        raise argparse.ArgumentTypeError(f"{value!r} contains a NUL byte, which no file name can hold")
    problem = name_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}; rename the file or folder")
    longest = max((len(part.encode("utf-8")) for part in Path(value).parts), default=0)
    if longest > 255 or len(value.encode("utf-8")) > 4095:
        raise argparse.ArgumentTypeError(f"{value[:60]}…: longer than file names can be (255 bytes a part)")
    return Path(value)


def _config_from(args: argparse.Namespace, config_class):
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=path_argument, help="local diffusers pipeline or UNet folder")
    parser.add_argument("--scheduler", type=path_argument, help="scheduler folder, for a bare UNet folder --model")
    parser.add_argument(
        "--lora",
        type=path_argument,
        help="LoRA adapter folder (diffusers/peft/kohya format), fused into an SD, SDXL or SD3 --model",
    )
    parser.add_argument(
        "--variant", help="weight-file variant of the --model folders, e.g. fp16 (*.fp16.safetensors; run in fp32)"
    )
    parser.add_argument(
        "--train",
        required=True,
        type=path_argument,
        help="training images: an image folder (imagefolder layout), a datasets save_to_disk folder or a parquet file",
    )
    _add_column_flags(parser)
    parser.add_argument("--run-dir", required=True, type=path_argument, help="where caches and results are stored")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, … (default: auto)")
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=MAX_IMAGE_PIXELS,
        help=f"largest width × height of an image read, checked before decoding (default: {MAX_IMAGE_PIXELS:,})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_flags(parser, ScoringConfig)


def _add_column_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-column", help="image column of a datasets table (default: image)")
    parser.add_argument("--caption-column", help="caption column of the metadata or table (default: text)")
    parser.add_argument("--label-column", help="class-label column of the metadata or table (default: label)")
    parser.add_argument(
        "--allow-empty-captions",
        action="store_true",
        help="text-to-image models: score training images without a caption under the empty prompt (else an error)",
    )


def _columns(args):
    from .data import Columns

    return Columns(image=args.image_column, caption=args.caption_column, label=args.label_column)


def _add_clip_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture, or a model-config JSON file")
    parser.add_argument(
        "--clip-weights", type=path_argument, help="local open_clip checkpoint (.safetensors, .pt, .bin)"
    )


def _clip(args):
    """The CLIP model when weights were given; nothing is ever downloaded."""
    if args.clip_weights is None:
        return None
    from .clip import ClipEmbedder
    from .models import resolve_device

    return ClipEmbedder(args.clip_model, args.clip_weights, device=resolve_device(args.device))


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other diffattr error (``--help`` shows usage)."""

    def error(self, message: str):
        command = self.prog.removeprefix("diffattr").strip()
        self.exit(2, f"diffattr: error: {command + ': ' if command else ''}{' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffattr", description="Which training images made this generated image?")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
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
    attribute.add_argument(
        "--query", required=True, action="append", type=path_argument, help="query image (repeatable)"
    )
    attribute.add_argument(
        "--label",
        action="append",
        help="class label of the queries, an index or a class name (once for all, or once per --query)",
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
        "--retriever",
        default="l2",
        choices=sorted(RETRIEVERS),
        help="how --candidates are found: l2, the M nearest encodings (default); loss, those and the M the "
        "query's perturbed copy moves most at one timestep (one more pass at 1 of the K timesteps)",
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
        "--leakage",
        type=path_argument,
        metavar="TEST_DIR",
        help="test image folder: which test images copy training images",
    )
    audit.add_argument(
        "--mislabeled", action="store_true", help="also rank training images by mislabel score (class-conditional)"
    )
    audit.add_argument("--top-k", type=int, default=10, help="images to print (report.json lists all; default: 10)")
    _add_config_flags(audit, AuditConfig)
    _add_config_flags(audit, AttributionConfig)

    demo = commands.add_parser("demo", help="offline demo: bundled toy model and digits → attributions")
    demo.add_argument(
        "--out", type=path_argument, default=Path("diffattr-demo"), help="output folder (default: diffattr-demo)"
    )
    demo.add_argument("--device", default="auto")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    gallery = commands.add_parser("gallery", help="static HTML pages of a run directory's attributions and audit")
    gallery.add_argument("--run-dir", required=True, type=path_argument, help="a run directory of `diffattr attribute`")
    gallery.add_argument("--out", type=path_argument, help="output folder (default: <run-dir>/gallery)")
    gallery.add_argument("--top-k", type=int, help="training images per query (default: all in result.json)")
    gallery.add_argument("--train", type=path_argument, help="training image folder (default: the one in config.json)")
    _add_clip_flags(gallery)
    gallery.add_argument("--device", default="auto", help="where CLIP runs: cpu, cuda, … (default: auto)")
    gallery.add_argument("--quiet", action="store_true", help="no progress bars")

    export = commands.add_parser(
        "export", help="a run directory's rankings as a table (one row per query × rank) and its score matrix"
    )
    export.add_argument("--run-dir", required=True, type=path_argument, help="a run directory of `diffattr attribute`")
    export.add_argument("--format", default="csv", choices=["csv", "jsonl", "parquet"], help="table format")
    export.add_argument("--out", type=path_argument, help="table file (default: <run-dir>/results.<format>)")
    export.add_argument("--top-k", type=int, help="rows per query (default: as many as its result.json lists)")
    export.add_argument("--train", type=path_argument, help="training data for captions (default: config.json's)")
    export.add_argument("--quiet", action="store_true", help="print nothing but errors")

    for command in commands.choices.values():  # also after the subcommand; SUPPRESS keeps the main flag's value
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
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
        variant=args.variant,
        device=args.device,
        progress=not args.quiet,
        max_image_pixels=args.max_image_pixels,
        columns=_columns(args),
        allow_empty_captions=args.allow_empty_captions,
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
            retriever=args.retriever,
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
    elif args.command == "export":
        from .export import export

        out = args.out or args.run_dir / f"results.{args.format}"
        table, matrix = export(args.run_dir, out, fmt=args.format, top_k=args.top_k, train=args.train)
        if not args.quiet:
            _say(f"rows: {table}\nscore matrix: {matrix}")
    elif args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, device=args.device, progress=not args.quiet)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:500] or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; no traceback reaches the user unless ``--debug`` asks for it."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except DiffattrError as error:
        if args.debug:
            raise
        print(f"diffattr: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("diffattr: interrupted; rerun the same command to resume (finished work is kept)", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        if isinstance(error, OSError) and error.filename is not None:  # a folder where a file must be, …
            print(f"diffattr: error: {_one_line(f'{error.filename}: {error.strerror or error}')}", file=sys.stderr)
            return 2
        print(
            f"diffattr: unexpected error: {type(error).__name__}: {_one_line(error)} (rerun with --debug for the "
            "traceback)",
            file=sys.stderr,
        )
        return 1
    return 0
