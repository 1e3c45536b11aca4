"""Builds benchmarks/RESULTS.md from the tables the evaluation scripts wrote to benchmarks/results/.

Each section is the script's protocol (its docstring), the exact command, and its table; a summary
up front puts diffattr's default beside the anchors on every protocol.

    python benchmarks/collect_results.py
"""

import ast
import json
import re
from pathlib import Path

from diffattr.config import AttributionConfig

HERE = Path(__file__).parent
RESULTS = HERE / "results"
ROOT = HERE.parent
# (results name, script that writes it, title)
SECTIONS = [
    ("leakage", "benchmarks/eval_leakage.py", "Planted duplicates / leakage"),
    ("leakage_sweep", "benchmarks/eval_leakage.py", "Planted duplicates: Forward-INF settings sweep"),
    ("customization", "benchmarks/eval_customization.py", "Customization"),
    ("customization_sweep", "benchmarks/eval_customization.py", "Customization: Forward-INF settings sweep"),
    ("lds", "benchmarks/eval_lds.py", "Linear datamodeling score (LDS)"),
    ("lds_sweep", "benchmarks/eval_lds.py", "LDS: Forward-INF settings sweep"),
    ("customization_text", "benchmarks/eval_customization_text.py", "Customization with text (text-to-image, LoRA)"),
    (
        "customization_text_sweep",
        "benchmarks/eval_customization_text.py",
        "Customization with text: perturbation choices",
    ),
    ("zoo", "benchmarks/eval_zoo.py", "Every model of the zoo: planted duplicates, one model held out"),
    (
        "lds_zoo",
        "benchmarks/eval_lds.py",
        "LDS on every world of the zoo (100 subset models, 32 + 32 queries), one held out",
    ),
    (
        "customization_zoo",
        "benchmarks/eval_customization.py",
        "Customization on every world of the zoo (4 concepts x 4 samples), one held out",
    ),
    ("counterfactual", "benchmarks/eval_counterfactual.py", "Counterfactual: retrain without each query's top-K"),
    ("audit", "benchmarks/eval_audit.py", "Memorization audit"),
    ("zoo_audit", "benchmarks/eval_zoo_audit.py", "Memorization audit on every model of the zoo"),
    ("leakage_candidates", "benchmarks/eval_leakage.py", "Planted duplicates under --candidates M"),
    ("customization_candidates", "benchmarks/eval_customization.py", "Customization under --candidates M"),
    ("lds_candidates", "benchmarks/eval_lds.py", "LDS under --candidates M"),
    ("speed", "benchmarks/bench_speed.py", "Speed: Forward-INF vs D-TRAK"),
    ("queries", "benchmarks/bench_queries.py", "Many queries, one pass"),
    ("dtype_bf16", "benchmarks/bench_dtype.py", "Scoring precision: bf16 against fp32"),
    ("scale", "benchmarks/bench_scale.py", "Cost at realistic model sizes: Forward-INF vs D-TRAK"),
    ("memory", "benchmarks/bench_memory.py", "Memory of every verb: 1k vs 10k training images"),
]
# The summary's metric per protocol: (results name, key path into a method's entry, label).
SUMMARY = [
    ("leakage", ("replicas",), "leakage: top-1 of replicas"),
    ("leakage", ("training images",), "leakage: top-1 of training images"),
    ("customization", ("recall@10",), "customization: Recall@10"),
    ("customization", ("mAP",), "customization: mAP"),
    ("lds", ("generated", "lds"), "LDS, generated queries"),
    ("lds", ("held-out", "lds"), "LDS, held-out queries"),
    ("customization_text", ("recall@10",), "text-to-image customization: Recall@10"),
    ("customization_text", ("mAP",), "text-to-image customization: mAP"),
]
DEFAULT = f"forward-inf[default|{AttributionConfig().aggregation}]"  # the package's default setting
FIXED_DAMPING = "dtrak[λ=0.01]"  # the package default (GradientConfig.damping)


def escape_names(text: str) -> str:
    """Escapes the "|" inside method names like ``forward-inf[default|loss]`` in Markdown tables."""
    return re.sub(r"\[[^\]\n]*\]", lambda m: m.group(0).replace("\\|", "|").replace("|", "\\|"), text)


def protocol_text(script: str) -> str:
    doc = ast.get_docstring(ast.parse((ROOT / script).read_text())) or ""
    return doc.split("\n\n    python")[0].strip()


def swept_methods(name: str) -> dict:
    """The sweep's methods with the protocol table's rows on top: the table is always the latest run
    of the default setting, a sweep may be older."""
    methods = json.loads((RESULTS / f"{name}.json").read_text())["methods"]
    sweep_file = RESULTS / f"{name}_sweep.json"
    return {**json.loads(sweep_file.read_text())["methods"], **methods} if sweep_file.is_file() else methods


def summary() -> str:
    rows = []
    for name, path, label in SUMMARY:
        file = RESULTS / f"{name}.json"
        if not file.is_file():
            continue
        payload = json.loads(file.read_text())
        methods = payload["methods"]

        def value(method, methods=methods, path=path):
            entry = methods[method]
            for key in path:
                entry = entry[key]
            return entry

        sweep = swept_methods(name)
        forward = {m: value(m, sweep) for m in sweep if m.startswith("forward-inf")}
        best_forward = max(forward, key=forward.get)
        dtrak = {m: value(m) for m in methods if m.startswith("dtrak")}
        best_dtrak = max(dtrak, key=dtrak.get) if dtrak else None
        best_name = best_forward[12:-1].replace("|", ", ")
        cells = [label, f"{value(DEFAULT):.3f}", f"{forward[best_forward]:.3f} ({best_name})"]
        cells.append(f"{value('pixel'):.3f}")
        cells.append(f"{value('tracin'):.3f}" if "tracin" in methods else "—")
        cells.append(f"{dtrak[FIXED_DAMPING]:.3f}" if FIXED_DAMPING in dtrak else "—")
        cells.append(f"{dtrak[best_dtrak]:.3f} ({best_dtrak[6:-1]})" if best_dtrak else "—")
        rows.append("| " + " | ".join(cells) + " |")
    header = "| metric | diffattr default | Forward-INF best | pixel ℓ2 | TracIn | D-TRAK λ=0.01 | D-TRAK best λ |"
    return "\n".join([header, "|---|---|---|---|---|---|---|", *rows])


def sweep_table() -> str:
    """Every Forward-INF setting (× aggregation) measured in any sweep, one column per metric."""
    columns, values = [], {}
    for name, path, label in SUMMARY:
        if not (RESULTS / f"{name}_sweep.json").is_file():
            continue
        columns.append(label)
        for method, entry in swept_methods(name).items():
            if method.startswith("forward-inf["):
                for key in path:
                    entry = entry[key]
                values.setdefault(method[12:-1].replace("|", " · "), {})[label] = entry
    rows = []
    for setting, cells in values.items():
        rows.append("| " + " | ".join([setting] + [f"{cells[c]:.3f}" if c in cells else "" for c in columns]) + " |")
    header = "| setting · aggregation | " + " | ".join(columns) + " |"
    return "\n".join([header, "|" + "---|" * (len(columns) + 1), *rows])


def main():
    parts = [
        "# Results",
        "",
        "Regenerated by the scripts named in each section (their tables land in `benchmarks/results/`), then",
        "`python benchmarks/collect_results.py`. Toy scale, CPU (2 cores) unless a section says otherwise.",
        "",
        "## Summary: diffattr's default beside the anchors",
        "",
        "diffattr default = `forward-inf` with the package defaults (see README, *Defaults*). D-TRAK is shown at the",
        "package's fixed damping and at its best damping per row (λ as a multiple of the mean eigenvalue of ΦᵀΦ).",
        "",
        escape_names(summary()),
    ]
    parts += [
        "",
        "## Forward-INF settings across the protocols",
        "",
        "Each knob moved alone from the default (`default` row); empty cells were not run on that protocol",
        "(the leakage and customization sweeps cover direction, step size, steps and moving parameters; the",
        "text-to-image sweep, the moving parameters). The leakage and customization sweeps were run before the",
        "calibration default went from R = 8 to R = 16 images: their `calibrated` rows other than the default",
        "setting's use R = 8 (the `default` rows come from the latest runs, R = 16).",
        "",
        escape_names(sweep_table()),
    ]
    for name, script, title in SECTIONS:
        table = RESULTS / f"{name}.md"
        if not table.is_file():
            continue
        parts += ["", f"## {title}", "", protocol_text(script), "", escape_names(table.read_text().strip())]
        carried = json.loads((RESULTS / f"{name}.json").read_text()).get("carried_over")
        if carried:
            kept = ", ".join(carried)
            parts += ["", f"Rows kept from the previous run of the same script (not recomputed this time): {kept}."]
    (HERE / "RESULTS.md").write_text("\n".join(parts) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
