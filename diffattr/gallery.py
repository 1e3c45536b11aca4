"""``diffattr gallery``: a run directory as static HTML pages that people can look at.

```
<out>/index.html            every query: its image, prompt or label, method, top-1; link to the audit
<out>/query-<id>.html       one query: its image, the top-k training images (rank, id, score, caption,
                            CLIP similarity when asked), and the per-timestep delta plot (inline SVG)
<out>/audit.html            when <run-dir>/audit/report.json exists: memorized images ranked, each
                            beside its replicas and the evidence
<out>/gallery.css
<out>/img/<hash>-<px>.png   thumbnails, named by the content of their source image: each is written
                            once and shared by every page that shows it
```
The pages work from ``file://``: relative links, no script, no network. They are rendered by Jinja2
with autoescaping, so captions, ids, prompts and labels always show as text; a Content-Security-Policy
forbids scripts as a second line of defence. Pages and thumbnails are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .data import Columns, ImageRecord, TrainingImages, file_digest, is_dataset_table, load_image, open_training_images
from .errors import DiffattrError
from .files import atomic_write
from .names import visible
from .store import AUDIT_REPORT_FILE, CONFIG_FILE, RunDirectory, ids_digest

DEFAULT_AUDIT_ENTRIES = 50
THUMB_PX = 128  # training images and replicas
QUERY_PX = 256  # the query image
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,120}")


# -- small pure helpers ---------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_number(value, digits: int = 4) -> str:
    """A score for people: 4 significant digits, ``—`` for a missing or non-numeric value."""
    if not _is_number(value):
        return "—"
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def format_value(value, *, limit: int = 300) -> str:
    """Any JSON value as one short line of text: numbers as :func:`format_number`, lists of numbers
    with 3 significant digits each (per-timestep values stay readable), the rest as JSON."""
    if isinstance(value, str):
        text = value
    elif _is_number(value):
        text = format_number(value)
    elif isinstance(value, list) and value and all(_is_number(v) for v in value):
        text = "[" + ", ".join(format_number(v, 3) for v in value) + "]"
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ticks(low: float, high: float) -> list[float]:
    """Up to five round values between ``low`` and ``high``."""
    span = high - low
    if span <= 0:
        return [low]
    step = 10 ** math.floor(math.log10(span / 4))
    for factor in (1, 2, 2.5, 5, 10):
        if span / (step * factor) <= 4:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def delta_plot(timesteps: torch.Tensor, deltas: torch.Tensor, top_rows: list[int], *, width=560, height=230) -> dict:
    """Coordinates of the per-timestep delta plot drawn by ``query.html`` as inline SVG.

    Shows, at each grid timestep, the loss change Δ = A − B of the top-1 image, the mean Δ of the
    top-k, and the mean and 5–95 % band of Δ over every training image: where the top-k leave the
    band is where the query's influence shows.

    Args:
        timesteps: ``(K,)`` grid timesteps.
        deltas: ``(N, K)`` loss changes of every training image.
        top_rows: row indices of the top-k, in rank order (at least one).

    Returns:
        ``{"width", "height", "series": [{"name", "css", "points", "dots"}], "band", "zero",
        "xticks", "yticks", "k"}`` with SVG user-space coordinates.
    """
    t = timesteps.double().numpy()
    d = deltas.double().numpy()
    k = len(top_rows)
    lines = {
        "all": d.mean(0),
        "top": d[top_rows].mean(0),
        "top1": d[top_rows[0]],
    }
    low, high = np.percentile(d, 5, axis=0), np.percentile(d, 95, axis=0)
    values = np.concatenate([*lines.values(), low, high, [0.0]])
    y_min, y_max = float(values.min()), float(values.max())
    if y_max - y_min < 1e-300:
        y_min, y_max = y_min - 1, y_max + 1
    pad = (y_max - y_min) * 0.06
    y_min, y_max = y_min - pad, y_max + pad
    x_min, x_max = float(t.min()), float(t.max())
    if x_max == x_min:
        x_min, x_max = x_min - 1, x_max + 1
    left, right, top, bottom = 62, 12, 12, 34

    def x(value: float) -> float:
        return round(left + (value - x_min) / (x_max - x_min) * (width - left - right), 1)

    def y(value: float) -> float:
        return round(top + (y_max - value) / (y_max - y_min) * (height - top - bottom), 1)

    def points(series) -> list[tuple[float, float]]:
        return [(x(a), y(b)) for a, b in zip(t, series)]

    names = {
        "all": f"all {d.shape[0]} images, mean",
        "top": f"top-{k} mean" if k > 1 else "top-1",
        "top1": "top-1",
    }
    order = ["all", "top", "top1"] if k > 1 else ["all", "top"]
    series = [
        {
            "name": names[key],
            "css": key,
            "points": " ".join(f"{a},{b}" for a, b in points(lines[key])),
            "dots": points(lines[key]),
        }
        for key in order
    ]
    band = points(high) + points(low)[::-1]
    every = max(1, math.ceil(len(t) / 10))
    return {
        "width": width,
        "height": height,
        "series": series,
        "band": " ".join(f"{a},{b}" for a, b in band),
        "zero": y(0.0),
        "left": left,
        "right": width - right,
        "bottom": height - bottom,
        "xticks": [(x(v), format_number(float(v), 3)) for v in t[::every]],
        "yticks": [(y(v), format_number(v, 2)) for v in _ticks(y_min, y_max)],
        "k": k,
    }


def _page_name(query_id: str) -> str:
    """``query-<id>.html`` for plain ids, a hash for anything that would need escaping in a URL."""
    if _SAFE_NAME.fullmatch(query_id) and not query_id.startswith("."):
        return f"query-{query_id}.html"
    return f"query-{hashlib.sha256(query_id.encode()).hexdigest()[:16]}.html"


def _inside(root: Path, path: Path) -> bool:
    return path == root or root in path.parents


def _resolve_inside(root: Path, name: str, *, what: str, source: Path) -> Path:
    """``root / name``, refusing names that lead outside ``root`` (``..``, absolute paths, links)."""
    try:
        path = (root / name).resolve()
    except (OSError, ValueError):  # a NUL byte, a link loop
        raise DiffattrError(f"{source}: {what} {name!r} is not a valid path") from None
    if not _inside(root.resolve(), path):
        raise DiffattrError(f"{source}: {what} {name!r} points outside {root}; refusing to read it")
    return path


# -- thumbnails ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thumb:
    """A thumbnail file, relative to the gallery folder, with its pixel size."""

    src: str
    width: int
    height: int


class Thumbnails:
    """Writes each source image's thumbnail once, named by the source's content and the box size.

    Identical images (duplicated training images, a replica shown on two pages) share one file,
    and a gallery rebuilt over an old one skips the thumbnails that already exist.

    Args:
        out: the gallery folder; thumbnails go to ``out/img/``.
    """

    def __init__(self, out: Path):
        self.folder = out / "img"
        self._made: dict[tuple[Path, int], Thumb | None] = {}
        self.written = 0

    def __call__(self, path: Path | TableImage | None, box: int = THUMB_PX) -> Thumb | None:
        """The thumbnail of a file or table image (``None`` when it is missing or unreadable)."""
        if path is None:
            return None
        key = (path, box)
        if key not in self._made:
            self._made[key] = self._make(path, box)
        return self._made[key]

    def _make(self, path: Path | TableImage, box: int) -> Thumb | None:
        if isinstance(path, TableImage):
            digest, opened = path.digest, path.open
        elif path.is_file():
            digest, opened = file_digest(path), lambda: path
        else:
            return None
        name = f"{digest}-{box}.png"
        target = self.folder / name
        try:
            if target.is_file():
                with Image.open(target) as existing:
                    return Thumb(f"img/{name}", *existing.size)
            with Image.open(opened()) as image:
                image.load()
                thumbnail = _thumbnail(image, box)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
            return None
        atomic_write(target, lambda temporary: thumbnail.save(temporary, format="PNG"))
        self.written += 1
        return Thumb(f"img/{name}", *thumbnail.size)


@dataclass(frozen=True)
class TableImage:
    """A training image held in a ``datasets`` table: known by its content digest, opened from its bytes."""

    digest: str
    open: Callable = field(compare=False, hash=False)  # → a file-like object


def _thumbnail(image: Image.Image, box: int) -> Image.Image:
    """Fits ``image`` in ``box`` pixels: small images grow by a whole factor with nearest-neighbour
    (16×16 digits stay crisp), large ones shrink with Lanczos."""
    if image.mode not in ("L", "RGB", "RGBA"):
        has_alpha = "A" in image.mode or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    longest = max(image.size)
    if longest <= box:
        factor = max(1, box // longest)
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    image = image.copy()
    image.thumbnail((box, box), Image.Resampling.LANCZOS)
    return image


# -- reading the run directory --------------------------------------------------------------------


@dataclass
class _Run:
    store: RunDirectory
    config: dict
    ids: list[str] | None
    timesteps: torch.Tensor | None
    train_root: Path | None
    train: TrainingImages | None = None  # the training images, when found (their fingerprint checked)
    _by_id: dict[str, ImageRecord] | None = None  # made on first use, once for every page

    def records(self) -> dict[str, ImageRecord]:
        """The training images (captions, labels, where to read them) by id; empty when they are unknown."""
        if self._by_id is None:
            self._by_id = {} if self.train is None else {record.id: record for record in self.train.records}
        return self._by_id

    def train_path(self, image_id: str, *, source: Path) -> Path | TableImage | None:
        """The image of a training id: its file, or its table row; ``None`` when the training set is unknown."""
        if self.train is not None and self.train.records[0].path is None:  # a datasets table (or object)
            record = self.records().get(image_id)
            if record is None:
                return None
            return TableImage(self.train.content_digest(record), lambda: self.train.source(record))
        if self.train_root is None:
            return None
        return _resolve_inside(self.train_root, image_id, what="training id", source=source)


def open_run(run_dir: Path, train: Path | TrainingImages | object | None) -> _Run:
    """A finished run directory, read for reporting (the gallery, ``diffattr export``): its settings,
    ids and grid, checked, and its training images when they can be found (fingerprint checked).
    ``train`` is a path, or the training set as an object (a ``datasets.Dataset``, which has no
    folder the run could have recorded)."""
    if not run_dir.exists():
        raise DiffattrError(f"--run-dir {run_dir}: no such folder")
    if not run_dir.is_dir():
        raise DiffattrError(f"--run-dir {run_dir} is not a folder")
    store = RunDirectory(run_dir)
    config = store.load_config()
    if config is None:
        raise DiffattrError(
            f"--run-dir {run_dir} is not a diffattr run directory (no {CONFIG_FILE}); run `diffattr attribute` first"
        )
    ids, timesteps = store.read_ids(), store.read_timesteps()
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    if ids is None and "ids_digest" in data:  # every ranking would be read without the row order it needs
        raise DiffattrError(f"{store.file('ids.json')} is missing; delete the run directory and rerun")
    if ids is not None and "ids_digest" in data and ids_digest(ids) != data["ids_digest"]:
        raise DiffattrError(
            f"{store.file('ids.json')} does not list the run's training images; delete the run directory"
        )
    if train is not None and not isinstance(train, (str, os.PathLike)):
        images = _checked_training_images(train, data.get("fingerprint"), _columns(data))
        return _Run(store, config, ids, timesteps, images.root, images)
    if train is not None:
        train_root = Path(train).expanduser().resolve()
        if not (train_root.is_dir() or is_dataset_table(train_root)):
            raise DiffattrError(f"--train {train}: no such folder, datasets folder or parquet file")
    else:
        root = data.get("root")
        train_root = Path(root).resolve() if isinstance(root, str) and Path(root).exists() else None
    images = None
    if train_root is not None:
        images = _checked_training_images(train_root, data.get("fingerprint"), _columns(data))
    return _Run(store, config, ids, timesteps, train_root, images)


def _columns(data: dict) -> Columns:
    """The columns the run was made with (recorded in its data section)."""
    named = data.get("columns") if isinstance(data.get("columns"), dict) else {}
    return Columns(**{key: named[key] for key in ("image", "caption", "label") if isinstance(named.get(key), str)})


def _checked_training_images(root, fingerprint: str | None, columns: Columns) -> TrainingImages | None:
    """The training images, refused when they or their captions changed since the run: their
    thumbnails and captions would sit beside scores computed on other images. Without a
    ``fingerprint`` (a run directory not written by diffattr) they are read unchecked, if they can be."""
    if fingerprint is None:
        try:
            return open_training_images(root, columns)
        except DiffattrError:
            return None
    images = open_training_images(root, columns)
    if images.fingerprint() != fingerprint:
        what = root if isinstance(root, (str, os.PathLike)) else "given as an object"
        raise DiffattrError(
            f"training data {what} has changed since the run (its images or captions differ from config.json's "
            "data fingerprint): pass the original folder with --train, or rerun `diffattr attribute`"
        )
    return images


def ranked_entries(run: _Run, result: dict, scores: dict, top_k: int | None) -> list[dict]:
    """The top-k of one query (default: as many as ``result.json`` lists), ranked from the stamped
    ``scores`` (``load_result`` refuses a folder without them), so that the page cannot disagree
    with the numbers; ``result.json``'s list alone only for a run without ``ids.json`` to name the rows."""
    listed = result.get("top") if isinstance(result.get("top"), list) else []
    top = [entry for entry in listed if isinstance(entry, dict)]
    if run.ids is None:  # with ids, load_result checked that the scores have one row per id
        return top if top_k is None else top[:top_k]
    values = scores["scores"].double()
    order = torch.sort(values, descending=True, stable=True).indices[: len(top) if top_k is None else top_k]
    order = order[torch.isfinite(values[order])].tolist()  # not the images a --candidates query left out
    known = {entry.get("id"): entry for entry in top}
    records = run.records()  # the fingerprinted training set's captions, when it is known
    ranked = []
    for rank, row in enumerate(order, start=1):
        image_id = run.ids[row]
        record = records.get(image_id)
        caption = {"text": record.text, "label": record.label} if record else known.get(image_id, {})
        ranked.append(
            {
                "rank": rank,
                "id": image_id,
                "score": float(scores["scores"][row]),
                "text": caption.get("text"),
                "label": caption.get("label"),
            }
        )
    return ranked


# -- CLIP ----------------------------------------------------------------------------------------


class _ClipSimilarity:
    """Cosine similarity of a query image to training images, each training image embedded once."""

    def __init__(self, clip):
        self.clip = clip
        self._embeddings: dict[Path, torch.Tensor | None] = {}

    def _load(self, path: Path | TableImage) -> torch.Tensor | None:
        if isinstance(path, Path) and not path.is_file():
            return None
        try:
            source = path.open() if isinstance(path, TableImage) else path
            return load_image(source, resolution=self.clip.image_size[0], channels=3)
        except DiffattrError:
            return None

    def _embed(self, paths: list[Path | TableImage]) -> None:
        missing = [p for p in dict.fromkeys(paths) if p not in self._embeddings]
        pixels = {p: self._load(p) for p in missing}
        loaded = [p for p in missing if pixels.get(p) is not None]
        vectors = self.clip.embed(torch.stack([pixels[p] for p in loaded])) if loaded else []
        self._embeddings.update(dict.fromkeys(missing))
        self._embeddings.update(zip(loaded, vectors))

    def similarities(self, query: Path, train: list[Path | TableImage | None]) -> list[float | None]:
        """Cosine similarity of ``query`` to each ``train`` image; ``None`` where a file is missing."""
        self._embed([query, *(p for p in train if p is not None)])
        vectors = self._embeddings
        if vectors[query] is None:
            return [None] * len(train)
        return [None if p is None or vectors[p] is None else float(vectors[query] @ vectors[p]) for p in train]


# -- pages ---------------------------------------------------------------------------------------


def templates_dir() -> Path:
    """``assets/gallery`` of a source checkout, or ``diffattr/_assets/gallery`` of a wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_assets" / "gallery", package.parent / "assets" / "gallery"):
        if (candidate / "base.html").is_file():
            return candidate
    raise DiffattrError("the gallery templates are missing; reinstall diffattr from its source tree")


def _environment() -> Environment:
    environment = Environment(
        loader=FileSystemLoader(templates_dir()),
        autoescape=True,  # every template, whatever its name: user strings always show as text
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        # Captions and prompts are data: their control characters are shown, not passed to the page.
        finalize=lambda value: visible(value) if type(value) is str else value,
    )
    environment.filters["number"] = format_number
    environment.filters["value"] = format_value
    return environment


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def _query_page(run: _Run, folder: Path, thumbs: Thumbnails, clip: _ClipSimilarity | None, top_k) -> dict:
    result, scores = run.store.load_result(folder, None if run.ids is None else len(run.ids))
    source = run.store.result_file(folder)  # named in errors
    query_id = str(result.get("query_id") or folder.name)
    entries = ranked_entries(run, result, scores, top_k)
    paths = [run.train_path(e["id"], source=source) if isinstance(e.get("id"), str) else None for e in entries]
    query_image = run.store.query_image(folder)
    if query_image.is_symlink() or not query_image.resolve().is_relative_to(run.store.path.resolve()):
        raise DiffattrError(f"{query_image} is a link; the gallery reads only the run directory's own files")
    similarity = clip.similarities(query_image, paths) if clip is not None else [None] * len(entries)
    # Rank of each image by CLIP similarity among the shown ones: where it differs from the
    # influence rank, influence and look-alikes disagree.
    by_look = sorted((i for i, sim in enumerate(similarity) if sim is not None), key=lambda i: -similarity[i])
    look_rank = {i: position for position, i in enumerate(by_look, start=1)}
    top = [
        {
            "rank": entry.get("rank", position),
            "id": str(entry.get("id", "")),
            "score": entry.get("score"),
            "text": entry.get("text"),
            "label": entry.get("label"),
            "clip": sim,
            "clip_rank": look_rank.get(position - 1),
            "thumb": thumbs(path),
        }
        for position, (entry, path, sim) in enumerate(zip(entries, paths, similarity), start=1)
    ]
    plot, deltas = None, scores.get("deltas")
    if deltas is not None and run.ids is not None and run.timesteps is not None and top:
        index = {image_id: row for row, image_id in enumerate(run.ids)}
        rows = [index[e["id"]] for e in top if e["id"] in index]
        shapes_match = deltas.ndim == 2 and deltas.shape == (len(run.ids), len(run.timesteps))
        if rows and shapes_match and torch.isfinite(deltas).all():
            plot = delta_plot(run.timesteps, deltas, rows)
    query_name = Path(str(result.get("query") or query_id)).name
    config = result.get("config") if isinstance(result.get("config"), dict) else {}
    settings = config.get("attribution") if isinstance(config.get("attribution"), dict) else {}
    return {
        "id": query_id,
        "page": _page_name(folder.name),  # folder names are unique; a result.json's query_id might not be
        "name": query_name,
        "query": result.get("query"),
        "prompt": result.get("prompt"),
        "label": result.get("label"),
        "method": result.get("method"),
        "image": thumbs(query_image, QUERY_PX),
        "top": top,
        "plot": plot,
        "direction": settings.get("direction") if isinstance(settings, dict) else None,
        "aggregation": settings.get("aggregation") if isinstance(settings, dict) else None,
        "timings": result.get("timings") if isinstance(result.get("timings"), dict) else {},
    }


def _evidence_images(value, run: _Run, folder: Path, source: Path) -> list[tuple[str, Path | None, list]] | None:
    """Evidence that shows images, as ``(name, file, details)``; ``None`` for evidence shown as text.

    Understood: ``[{"file": <path under audit/>, ...}]`` (replicas and other generated images),
    ``[{"id": <training id>, ...}]``, and a list of training ids (e.g. nearest neighbours).
    """
    items = value if isinstance(value, list) else [value]
    if not items:
        return None
    if all(isinstance(item, dict) and isinstance(item.get("file"), str) for item in items):
        return [
            (
                item["file"],
                _resolve_inside(folder, item["file"], what="evidence file", source=source),
                [(k, v) for k, v in item.items() if k != "file"],
            )
            for item in items
        ]
    known = set(run.ids or ())
    if all(isinstance(item, dict) and item.get("id") in known for item in items):
        return [
            (item["id"], run.train_path(item["id"], source=source), [(k, v) for k, v in item.items() if k != "id"])
            for item in items
        ]
    if all(isinstance(item, str) and item in known for item in items):
        return [(item, run.train_path(item, source=source), []) for item in items]
    return None


def _audit_page(run: _Run, thumbs: Thumbnails, limit: int, progress: bool) -> dict | None:
    folder = run.store.audit_dir
    source = run.store.audit_file(AUDIT_REPORT_FILE)
    if not source.is_file():
        return None
    report = run.store.load_json(source)  # refused unless this run's stamp: no audit of another run
    ranking = report.get("ranking")
    ranking = [entry for entry in ranking if isinstance(entry, dict)] if isinstance(ranking, list) else []
    entries = []
    for position, entry in enumerate(tqdm(ranking[:limit], disable=not progress, desc="audit page"), start=1):
        image_id = entry.get("id")
        path = run.train_path(image_id, source=source) if isinstance(image_id, str) else None
        evidence = entry.get("evidence") if isinstance(entry.get("evidence"), dict) else {}
        images, facts = [], []
        for key, value in evidence.items():
            shown = _evidence_images(value, run, folder, source)
            if shown is None:
                facts.append((key, value))
            else:
                items = [{"file": name, "thumb": thumbs(file), "details": details} for name, file, details in shown]
                images.append((key, items))
        entries.append(
            {
                "rank": position,
                "id": image_id if image_id is not None else "",
                "score": entry.get("score"),
                "thumb": thumbs(path),
                "signals": [(k, v) for k, v in entry.items() if k not in {"id", "score", "evidence"}],
                "images": images,
                "facts": facts,
            }
        )
    about = [(k, v) for k, v in report.items() if k != "ranking"]
    return {"entries": entries, "total": len(ranking), "about": about}


def write_gallery(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    top_k: int | None = None,
    train: str | os.PathLike | None = None,
    clip=None,
    audit_entries: int = DEFAULT_AUDIT_ENTRIES,
    progress: bool = True,
) -> Path:
    """Renders a run directory's attributions (and audit, when there is one) as static HTML.

    Args:
        run_dir: a diffattr run directory.
        out: the gallery folder (default: ``<run-dir>/gallery``).
        top_k: training images per query page (default: every one in ``result.json``; more are
            taken from ``scores.safetensors`` when asked).
        train: the training image folder, ``datasets`` folder or parquet file (default: the one
            recorded in ``config.json``), or the training set as an object — a ``datasets.Dataset``
            given to the :class:`~diffattr.Attributor` has no path to record, so its thumbnails and
            captions need it here (:meth:`Attributor.gallery` passes it).
        clip: a :class:`~diffattr.clip.ClipEmbedder`: shows the CLIP cosine similarity of each
            top-k image to the query beside its influence score.
        audit_entries: memorized images listed on the audit page (the first of its ranking).
        progress: show progress bars.

    Returns:
        The path of ``index.html``.

    Raises:
        DiffattrError: the run directory is missing or invalid, or names files outside its folders.
    """
    run_dir = Path(run_dir).expanduser()
    if top_k is not None and top_k < 1:
        raise DiffattrError(f"--top-k {top_k}: must be at least 1")
    run = open_run(run_dir, train)
    out = Path(out).expanduser() if out is not None else run_dir / "gallery"
    if out.exists() and not out.is_dir():
        raise DiffattrError(f"--out {out} exists and is not a folder")
    if run.train_root is not None and run.train_root.is_dir() and out.resolve().is_relative_to(run.train_root):
        raise DiffattrError(f"--out {out} is inside the training folder {run.train_root}: its thumbnails would join it")
    thumbs = Thumbnails(out)
    similarity = _ClipSimilarity(clip) if clip is not None else None
    environment = _environment()
    queries = [
        _query_page(run, folder, thumbs, similarity, top_k)
        for folder in tqdm(run.store.query_folders(), disable=not progress, desc="gallery pages")
    ]
    audit = _audit_page(run, thumbs, audit_entries, progress)
    data = run.config.get("data") if isinstance(run.config.get("data"), dict) else {}
    site = {
        "run_dir": str(run_dir),
        "train_root": str(run.train_root) if run.train_root else data.get("root"),
        "num_train": len(run.ids) if run.ids is not None else data.get("num_images"),
        "model": (run.config.get("model") or {}).get("source") if isinstance(run.config.get("model"), dict) else None,
        "has_audit": audit is not None,
        "clip": getattr(clip, "name", None),
        "missing_images": len({e["id"] for q in queries for e in q["top"] if e["thumb"] is None}),
    }
    css = (templates_dir() / "gallery.css").read_text(encoding="utf-8")
    _write_text(out / "gallery.css", css)
    for position, query in enumerate(queries):
        neighbours = {
            "previous": queries[position - 1] if position > 0 else None,
            "next": queries[position + 1] if position + 1 < len(queries) else None,
        }
        html = environment.get_template("query.html").render(site=site, q=query, **neighbours)
        _write_text(out / query["page"], html)
    if audit is not None:
        _write_text(out / "audit.html", environment.get_template("audit.html").render(site=site, audit=audit))
    index = out / "index.html"
    _write_text(index, environment.get_template("index.html").render(site=site, queries=queries))  # last: done
    return index
