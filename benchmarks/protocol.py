"""What the evaluation scripts share: the Forward-INF settings swept, every method's score
matrices for one (model, training set, queries), and writing a results table as JSON + Markdown.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from diffattr.baselines import SCORERS, ScorerContext
from diffattr.candidates import candidate_rows, retrieval_column
from diffattr.config import RETRIEVERS, AttributionConfig, GradientConfig, ScoringConfig
from diffattr.denoisers import DiffusionModel
from diffattr.engine import Engine, Queries, TrainingSet
from diffattr.gradients import kernel_scores
from diffattr.metrics import mean_average_precision, recall_at_k
from diffattr.noise import ScoringGrid
from diffattr.scoring import aggregate, top_k

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT = AttributionConfig()
DEFAULT_K, DEFAULT_S = 10, 1
DAMPINGS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, math.inf)
CANDIDATE_FRACTIONS = (0.02, 0.05, 0.1, 0.25, 0.5)  # --candidates M as a fraction of N


@dataclasses.dataclass(frozen=True)
class Setting:
    """One Forward-INF setting: the attribution config plus the scoring grid K and draws S."""

    config: AttributionConfig = DEFAULT
    num_timesteps: int = DEFAULT_K
    num_draws: int = DEFAULT_S
    label: str | None = None  # a name for a recipe, in place of the list of changed fields

    def name(self) -> str:
        if self.label:
            return self.label
        changed = [
            f"{f.name}={getattr(self.config, f.name)}"
            for f in dataclasses.fields(AttributionConfig)
            if f.name != "aggregation" and getattr(self.config, f.name) != getattr(DEFAULT, f.name)
        ]
        changed += [f"K={self.num_timesteps}"] if self.num_timesteps != DEFAULT_K else []
        changed += [f"S={self.num_draws}"] if self.num_draws != DEFAULT_S else []
        return ", ".join(changed) or "default"


_replace = dataclasses.replace
# The settings the zoo's models choose among (eval_zoo.py; eval_lds.py --sweep zoo runs ZOO_LDS_SETTINGS).
ZOO_SETTINGS = [
    Setting(),
    Setting(_replace(DEFAULT, direction="descent", learning_rate=1e-3)),
    # By effect: a step small enough that the target takes several steps (the default's 10 steps
    # of 1e-4 raise a memorized toy query's loss 7-30x; one step of 3e-4 already 2-5x).
    Setting(_replace(DEFAULT, target_change=1.0, steps=50, learning_rate=1e-5)),
    Setting(_replace(DEFAULT, target_change=4.0, steps=50, learning_rate=1e-5)),
    Setting(_replace(DEFAULT, direction="descent", target_change=0.5, steps=50, learning_rate=3e-5)),
    # MUCS's recipe (Sony, 2026) on this engine: AdamW at the training lr (2e-3) / 10, attention,
    # biases, embeddings and the outer layers frozen, a retain batch of 64, λ = 0.2, stop at
    # 0.95 L_null, but at most 50 steps (the toy models' queries need more than 200 to get there,
    # 33 s each on 2 cores); its own score is the `ratio` aggregation.
    Setting(
        _replace(
            DEFAULT,
            optimizer="adamw",
            learning_rate=2e-4,
            params="mucs",
            retain_batch=64,
            query_weight=0.2,
            null_stop=0.95,
            steps=50,
        ),
        label="mucs (≤ 50 steps)",
    ),
    # AbU's recipe (Wang et al., NeurIPS 2024) on this engine: ascent on the query with an EWC
    # penalty from the training loss's diagonal Fisher (mean 1), at two weights; its score is `loss`.
    Setting(_replace(DEFAULT, ewc_weight=1.0)),
    Setting(_replace(DEFAULT, ewc_weight=100.0)),
]
# LDS retrains 100 models per world and scores 64 queries with each setting. It leaves out three
# settings that planted duplicates already placed: target_change 1.0 and EWC weight 100 scored at or
# below their neighbours (target_change 4.0, EWC weight 1) on every model (results/zoo.md), and
# descent by effect is represented by descent at a fixed step; the by-effect settings cost ~3x the
# default per query.
ZOO_LDS_SETTINGS = [ZOO_SETTINGS[i] for i in (0, 1, 3, 5, 6)]


def sweep_settings(level: str) -> list[Setting]:
    """``default``: the default only; ``core``: direction, step size, steps and moving parameters
    around the default (for the protocols with a large training set); ``one-at-a-time``: ``core``
    plus draws per step, optimizer, grid K and noise draws S, each moved alone."""
    settings = [Setting()]
    if level == "default":
        return settings
    replace = dataclasses.replace
    for lr in (3e-5, 3e-4):
        settings.append(Setting(replace(DEFAULT, learning_rate=lr)))
    for lr in (3e-5, 1e-4, 3e-4):
        settings.append(Setting(replace(DEFAULT, direction="descent", learning_rate=lr)))
    settings.append(Setting(replace(DEFAULT, steps=3)))
    settings.append(Setting(replace(DEFAULT, params="attention")))
    if level == "core":
        return settings
    settings.append(Setting(replace(DEFAULT, steps=30)))
    settings.append(Setting(replace(DEFAULT, draws_per_step=16)))
    settings.append(Setting(replace(DEFAULT, optimizer="sgd", learning_rate=1e-2)))
    for k in (5, 20):
        settings.append(Setting(num_timesteps=k))
    settings.append(Setting(num_draws=4))
    return settings


def all_method_scores(
    model: DiffusionModel,
    train: TrainingSet,
    queries: Queries,
    *,
    settings: list[Setting],
    gradient_methods: bool = True,
    gradient_timesteps: tuple[int, ...] = (DEFAULT_K,),
    projection_dim: int = 1024,
    seed: int = 0,
    progress: bool = True,
    default_losses: dict | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``{method name: (Q, N) scores}`` and seconds spent per method family.

    ``default_losses``, if given, receives the default setting's ``baseline`` ``(N, K)``, its
    calibration ``reference`` ``(N,)`` and each query's ``after`` ``(Q, N, K)`` (the retrievers of
    :func:`add_candidate_scores` score on them).

    Forward-INF appears once per (setting, aggregation) as ``forward-inf[<setting>|<aggregation>]``;
    D-TRAK once per damping as ``dtrak[λ=<damping>]``; gradient methods on another grid than the
    default K carry it in the name (``tracin[K=100]``, ``dtrak[K=100, λ=...]``).
    """
    scores, seconds = {}, {}
    start = time.perf_counter()
    pixel = SCORERS["pixel"](ScorerContext(model, None, seed, GradientConfig()))
    scores["pixel"] = pixel.scores(queries.encodings, train.encodings)
    seconds["pixel"] = time.perf_counter() - start
    engines, baselines = {}, {}
    start = time.perf_counter()
    for setting in settings:
        key = (setting.num_timesteps, setting.num_draws)
        if key not in engines:
            scoring = ScoringConfig(num_timesteps=key[0], num_draws=key[1], seed=seed)
            engines[key] = Engine(model, train, ScoringGrid.of(model.num_train_timesteps, scoring), progress=progress)
            baselines[key] = engines[key].baseline()
        if setting == Setting() and default_losses is not None:
            reference, _ = engines[key].calibration(setting.config, baselines[key])
            after = []
            matrices = engines[key].query_scores(
                queries, setting.config, baseline=baselines[key], reference=reference, losses_out=after
            )
            default_losses.update(baseline=baselines[key], reference=reference, after=torch.stack(after))
        else:
            matrices = engines[key].query_scores(queries, setting.config, baseline=baselines[key])
        for aggregation, matrix in matrices.items():
            scores[f"forward-inf[{setting.name()}|{aggregation}]"] = matrix
    seconds["forward-inf"] = time.perf_counter() - start
    for method in ("tracin", "dtrak") if gradient_methods else ():
        for num_timesteps in gradient_timesteps:
            start = time.perf_counter()
            grid = ScoringGrid.of(model.num_train_timesteps, ScoringConfig(num_timesteps=num_timesteps, seed=seed))
            context = ScorerContext(
                model, grid.timesteps, seed, GradientConfig(projection_dim=projection_dim), progress=progress
            )
            scorer = SCORERS[method](context)
            features = {
                side: scorer.featurise(data.encodings, data.conditions, names, description=side)
                for side, data, names in (("train", train, train.ids), ("query", queries, queries.names))
            }
            name = "" if num_timesteps == DEFAULT_K else f"K={num_timesteps}"
            if method == "tracin":
                scores[f"tracin[{name}]" if name else "tracin"] = scorer.scores(features["query"], features["train"])
            else:
                for damping in DAMPINGS:
                    matrix = kernel_scores(features["query"], features["train"], damping=damping)
                    scores[f"dtrak[{name + ', ' if name else ''}λ={damping:g}]"] = matrix
            seconds[f"{method}[{name}]" if name else method] = time.perf_counter() - start
    return scores, seconds


def leave_one_out(scores: dict[str, dict[str, float]], candidates: list[str]) -> dict[str, tuple[str, float]]:
    """Per held-out model, the candidate with the best mean score over the *other* models, and that mean.

    Args:
        scores: ``{model: {method: score}}``, higher is better.
        candidates: the methods to choose among; the first of equals wins (put the default first).
    """
    folds = {}
    for held_out in scores:
        others = [m for m in scores if m != held_out]
        on_others = {n: sum(scores[m][n] for m in others) / len(others) for n in candidates}
        chosen = max(candidates, key=on_others.get)
        folds[held_out] = (chosen, on_others[chosen])
    return folds


def world_results(table: str, worlds) -> tuple[dict[str, dict], list[str]]:
    """The saved ``<table>_<world>.json`` of each world that has one (two at least), and the
    methods all of them have, in the first one's order."""
    results = {}
    for world in worlds:
        path = RESULTS_DIR / f"{table}_{world}.json"
        if path.is_file():
            results[world] = json.loads(path.read_text())
    if len(results) < 2:
        raise SystemExit(f"--summary needs {table}_<world>.json of two worlds or more: run each world first")
    first = next(iter(results.values()))["methods"]
    return results, [n for n in first if all(n in r["methods"] for r in results.values())]


def held_out_folds(scores: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Per held-out world: the Forward-INF setting with the best mean score on the other worlds,
    its score there and on the held-out world, beside the default, pixel ℓ2, TracIn and D-TRAK
    (λ = 0.01 on the default grid, and the held-out world's best λ and grid K: an oracle).

    Args:
        scores: ``{world: {method: score}}`` (higher is better) over the methods every world has.
    """
    names = list(next(iter(scores.values())))
    folds = {}
    for held_out, (chosen, on_others) in leave_one_out(
        scores, [n for n in names if n.startswith("forward-inf[")]
    ).items():
        held = scores[held_out]
        dtraks = {n: v for n, v in held.items() if n.startswith("dtrak[")}
        folds[held_out] = {
            "chosen": chosen,
            "its score there": on_others,
            "held-out score": held[chosen],
            "default": held.get(default_name()),
            "pixel": held["pixel"],
            "tracin": held.get("tracin"),
            "dtrak[λ=0.01]": dtraks.get("dtrak[λ=0.01]"),
            "dtrak (best λ and K, oracle)": max(dtraks.values()) if dtraks else None,
        }
    return folds


def fold_table(folds: dict[str, dict], scale: float = 1.0) -> str:
    """:func:`held_out_folds` as a markdown table, scores times ``scale``."""
    rows = [
        [world, *["—" if v is None else (f"{scale * v:.1f}" if isinstance(v, float) else v) for v in fold.values()]]
        for world, fold in folds.items()
    ]
    return markdown_table(["held-out world", *next(iter(folds.values()))], rows)


def retrieval_metrics(per_group: dict[str, dict], names: list[str]) -> tuple[dict, dict]:
    """Recall@10 and mAP of every method over the queries of all groups (e.g. concepts).

    Args:
        per_group: ``{group: {"scores": {method: (Q, N)}, "relevant": (Q, N) bool}}``.
        names: the methods, in table order.

    Returns:
        ``({method: {"recall@10", "mAP"}}, {method: table row})``.
    """
    methods, rows = {}, {}
    for name in names:
        scores = torch.cat([group["scores"][name] for group in per_group.values()])
        relevant = torch.cat([group["relevant"] for group in per_group.values()])
        entry = {"recall@10": recall_at_k(scores, relevant, 10), "mAP": mean_average_precision(scores, relevant)}
        methods[name], rows[name] = entry, [name, entry["recall@10"], entry["mAP"]]
    return methods, rows


def toy_world(device: str = "cpu") -> tuple[DiffusionModel, TrainingSet, list]:
    """The bundled toy model, its 720 training images encoded (a throw-away run directory) and the
    held-out records: what the speed benchmarks run on."""
    import tempfile

    from diffattr import Attributor, ImageFolder
    from diffattr.demo import toy_paths

    paths = toy_paths()
    model = DiffusionModel.from_pretrained(paths["model"], device=device)
    with tempfile.TemporaryDirectory() as run_dir:
        attributor = Attributor(model, paths["train"], run_dir, progress=False)
        encodings, conditions = attributor.encodings()
    return model, TrainingSet(encodings, conditions, attributor.ids), ImageFolder(paths["heldout"]).records


def default_name() -> str:
    return f"forward-inf[default|{DEFAULT.aggregation}]"


def candidate_name(fraction: float, retriever: str = "l2") -> str:
    suffix = "" if retriever == "l2" else f", {retriever}"
    return f"forward-inf[default|{DEFAULT.aggregation}|M={fraction:g}N{suffix}]"


def add_candidate_scores(
    scores: dict[str, torch.Tensor],
    train: TrainingSet,
    queries: Queries,
    default_losses: dict,
    *,
    fill: float = -math.inf,
) -> dict[str, dict[str, float]]:
    """Adds the default's scores under ``--candidates M`` for each of :data:`CANDIDATE_FRACTIONS`
    and each ``--retriever``.

    The pre-filter scores each candidate exactly as the full pass does (same perturbation, same
    noise: ``tests/test_candidates.py``), so its scores are the full pass's on the candidate rows
    and ``fill`` elsewhere (−inf: never ranked; 0 for LDS sums: no influence counted). The ``loss``
    retriever's one-timestep scores are the full pass's at that column (``default_losses``, from
    :func:`all_method_scores`; the same noise).

    Returns:
        ``{name: {"recall": mean over queries of the fraction of the full pass's top-10 among the
        candidates, "cost": mean rows scored per query ÷ the full pass's N·K}}``.
    """
    full = scores[default_name()]
    num_images = full.shape[1]
    baseline, after = default_losses["baseline"], default_losses["after"]
    num_timesteps = baseline.shape[1]
    column = [retrieval_column(num_timesteps)]
    out = {}
    for retriever in RETRIEVERS:
        for fraction in CANDIDATE_FRACTIONS:
            count = max(1, round(fraction * num_images))
            masked, hits, costs = torch.full_like(full, fill), [], []
            for q in range(len(full)):
                rows = candidate_rows(queries.encodings[q], train.encodings, count)
                if retriever == "loss":
                    moved = aggregate(
                        DEFAULT.aggregation,
                        baseline=baseline[:, column],
                        after=after[q][:, column],
                        direction=DEFAULT.direction,
                        reference=default_losses["reference"],
                    )
                    rows = torch.unique(torch.cat([rows, top_k(moved, count)[1]]))
                masked[q, rows] = full[q, rows]
                hits.append(torch.isin(full[q].topk(min(10, num_images)).indices, rows).float().mean().item())
                extra = num_images if retriever == "loss" else 0  # the retriever's pass at one timestep
                costs.append((extra + len(rows) * num_timesteps) / (num_images * num_timesteps))
            name = candidate_name(fraction, retriever)
            scores[name] = masked
            out[name] = {"recall": sum(hits) / len(hits), "cost": sum(costs) / len(costs)}
    return out


def mean_candidate_stats(per_group: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The mean over groups (of equal numbers of queries) of :func:`add_candidate_scores`' numbers."""
    return {
        name: {key: sum(group[name][key] for group in per_group) / len(per_group) for key in per_group[0][name]}
        for name in per_group[0]
    }


def write_candidate_table(
    name: str, header: list[str], rows: dict[str, list], stats: dict[str, dict[str, float]]
) -> None:
    """``<name>_candidates``: the protocol's metrics of the default against M and the retriever, with
    the recall of the full pass's top-10 among the candidates and the cost against the full pass."""
    table = [["all (M = N)", "—", 1.0, 1.0, *rows[default_name()][1:]]]
    for retriever in RETRIEVERS:
        for f in CANDIDATE_FRACTIONS:
            entry = stats[candidate_name(f, retriever)]
            row = rows[candidate_name(f, retriever)][1:]
            table.append([f"M = {f:g} N", retriever, entry["recall"], entry["cost"], *row])
    payload = {"candidates": stats, "rows": table}
    header = ["--candidates", "--retriever", "recall of full top-10", "rows ÷ full pass", *header[1:]]
    write_results(f"{name}_candidates", payload, markdown_table(header, table))


def write_results(name: str, payload: dict, markdown: str) -> None:
    """Writes ``results/<name>.json`` and ``results/<name>.md`` (with the command that made them)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]])
    payload = {"command": command, **payload}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS_DIR / f"{name}.md").write_text(f"Command: `{command}`\n\n{markdown}\n")
    print(markdown)
    print(f"\nwrote {RESULTS_DIR / name}.json and .md")


def write_tables(name: str, payload: dict, header: list[str], rows: dict[str, list], *, swept: bool) -> None:
    """Writes ``<name>`` (default Forward-INF setting and the baselines) and, after a sweep,
    ``<name>_sweep`` (every setting). Methods this run did not compute (e.g. ``--no-gradients``)
    keep their rows from the previous ``<name>`` table, marked in ``"carried_over"``."""

    def keep(method: str) -> bool:
        if "|M=" in method:  # pre-filtered rows: in <name>_candidates only
            return False
        return not method.startswith("forward-inf[") or method.startswith("forward-inf[default|")

    if swept:
        swept_rows = {m: row for m, row in rows.items() if "|M=" not in m}
        swept_methods = {m: v for m, v in payload["methods"].items() if "|M=" not in m}
        swept_payload = {**payload, "methods": swept_methods, "rows": swept_rows}
        write_results(f"{name}_sweep", swept_payload, markdown_table(header, list(swept_rows.values())))
    methods = {m: v for m, v in payload["methods"].items() if keep(m)}
    kept_rows = {m: row for m, row in rows.items() if keep(m)}
    previous_file = RESULTS_DIR / f"{name}.json"
    carried = []
    if previous_file.is_file():
        previous = json.loads(previous_file.read_text())
        for method, row in previous.get("rows", {}).items():
            if method not in kept_rows and keep(method):
                kept_rows[method], methods[method] = row, previous["methods"][method]
                carried.append(method)
    payload = {**payload, "methods": methods, "rows": kept_rows, "carried_over": carried}
    write_results(name, payload, markdown_table(header, list(kept_rows.values())))


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value):
        # Method names hold "|" (setting|aggregation): escaped, or Markdown splits the cell.
        return f"{value:.3f}" if isinstance(value, float) else str(value).replace("\\|", "|").replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
