"""The HTML gallery: every image, rank and score on the pages; hostile strings shown as text."""

import json
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffattr import AttributionConfig, Attributor, DiffattrError, ScoringConfig
from diffattr.cli import main
from diffattr.data import load_image
from diffattr.gallery import Thumbnails, _page_name, delta_plot, format_number, write_gallery
from diffattr.store import RunDirectory, read_json, write_json

from .conftest import write_images

DATA = Path(__file__).resolve().parent / "data"
# Would run a script if it were ever rendered as markup; the browser test checks `window.pwned`.
HOSTILE = '<img src=x onerror="window.pwned=1;alert(1)">'
HOSTILE_SCRIPT = "<script>window.pwned=2</script>"
HOSTILE_FILE = "<img src=x onerror=alert(1)>.png"  # a legal file name
HOSTILE_ID = f"a/{HOSTILE_FILE}"


class Page(HTMLParser):
    """The parts of a page the tests look at: tags with their attributes, and the visible text."""

    def __init__(self, path: Path):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.chunks: list[str] = []
        self.raw = path.read_text(encoding="utf-8")
        self.feed(self.raw)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.chunks.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.chunks).split())

    def attr(self, tag: str, name: str) -> list[str]:
        return [attrs[name] for t, attrs in self.tags if t == tag and name in attrs]


def _png(path: Path, seed: int, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(path)
    return path


def build_run(root: Path, tiny_model: Path) -> dict:
    """A real run directory (two attributed queries, one with a prompt and a method) over a training
    folder with a hostile file name and hostile captions, plus a hand-written audit report."""
    data = write_images(root / "data", 6)
    _png(data / HOSTILE_ID, seed=99)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"] = HOSTILE
    rows[1]["text"] = HOSTILE_SCRIPT
    rows.append({"file_name": HOSTILE_ID, "text": "hostile file name", "label": 1})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = root / "run"
    attributor = Attributor(
        tiny_model,
        data,
        run_dir,
        scoring=ScoringConfig(num_timesteps=3),
        attribution=AttributionConfig(steps=1, draws_per_step=4),
        progress=False,
    )
    results = attributor.attribute([data / HOSTILE_ID, data / "a" / "img_000.png"], top_k=7)
    # A hostile prompt (the toy model takes none), re-stamped as diffattr stamps a result it writes.
    store = RunDirectory(run_dir)
    folder = run_dir / "queries" / results[0].query_id
    record = {key: value for key, value in read_json(folder / "result.json").items() if key != "stamp"}
    tensors = load_file(folder / "scores.safetensors")
    pixels = load_image(folder / "query.png", channels=1, resolution=8)
    store.save_result(results[0].query_id, {**record, "prompt": HOSTILE, "method": "forward-inf"}, tensors, pixels)
    audit = run_dir / "audit"
    _png(audit / "replicas" / "0003.png", seed=3)
    _png(audit / "replicas" / "<b>7</b>.png", seed=7)
    report = {
        "note": HOSTILE,
        "settings": {"alpha": 0.5, "neighbours": 50},
        "signals": {"loss_gap": "robust z-score of the baseline loss", "replicas": HOSTILE_SCRIPT},
        "ranking": [
            {
                "id": "a/img_000.png",
                "score": 3.25,
                "loss_gap": 1.5,
                "replica_count": 2,
                "evidence": {
                    "replicas": [
                        {"file": "replicas/0003.png", "rank1": True, "distance": 0.125},
                        {"file": "replicas/<b>7</b>.png", "rank1": False},
                    ],
                    "copies": ["b/img_001.png", "b/img_003.png"],
                    "nearest": [{"id": "b/img_003.png", "distance": 0.0}, {"id": "a/img_002.png", "distance": 2.5}],
                    "loss_per_timestep": [0.0123456, 0.5, 1],
                    "note": HOSTILE_SCRIPT,
                },
            },
            {"id": HOSTILE_ID, "score": 1.5, "loss_gap": None},
            {"score": 0.75},
            {"id": "b/img_005.png", "evidence": {"replicas": []}},
            "not an entry",
        ],
    }
    store.save_json(audit / "report.json", report)
    return {"run_dir": run_dir, "data": data, "results": results}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    return build_run(tmp_path_factory.mktemp("gallery_run"), tiny_model)


@pytest.fixture(scope="module")
def gallery(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gallery")
    index = write_gallery(run["run_dir"], out, progress=False)
    assert index == out / "index.html"
    return out


def _pages(out: Path) -> dict[str, Page]:
    return {path.name: Page(path) for path in sorted(out.glob("*.html"))}


def _query_page(out: Path, query_id: str) -> Page:
    return Page(out / f"query-{query_id}.html")


def test_pages_show_every_image_rank_and_score(run, gallery):
    pages = _pages(gallery)
    assert set(pages) == {"index.html", "audit.html"} | {f"query-{r.query_id}.html" for r in run["results"]}
    for result in run["results"]:
        page = pages[f"query-{result.query_id}.html"]
        saved = read_json(run["run_dir"] / "queries" / result.query_id / "result.json")
        assert len(saved["top"]) == 7
        cards = page.text.split("Top 7 training images", 1)[1]
        for entry in saved["top"]:  # rank, score, id in rank order
            needle = f"#{entry['rank']} {format_number(entry['score'])} {entry['id']}"
            assert needle in cards
        assert len(page.attr("img", "src")) == 1 + 7  # the query and every training image
        assert page.attr("img", "alt")[1:] == [e["id"] for e in saved["top"]]
        assert "<svg" in page.raw and page.raw.count('class="line ') == 3  # the delta plot
        index_text = pages["index.html"].text
        assert result.query_id in index_text and f"top-1 {saved['top'][0]['id']}" in index_text
    for name, page in pages.items():
        for src in page.attr("img", "src"):
            assert src.startswith("img/") and (gallery / src).is_file(), (name, src)
            with Image.open(gallery / src) as image:
                assert min(image.size) >= 128  # 8×8 images upscaled, crisp
        for href in page.attr("a", "href"):
            assert (gallery / href).is_file(), (name, href)  # every link works from file://
        assert "gallery.css" in page.attr("link", "href")
    assert (gallery / "gallery.css").is_file()


def test_prompt_method_and_label_are_shown(run, gallery):
    first, second = (_query_page(gallery, r.query_id).text for r in run["results"])
    assert f"“{HOSTILE}”" in first and "method forward-inf" in first
    assert "prompt" not in second.lower() or HOSTILE not in second.split("Top")[0]
    assert "perturbation ascent" in second and "aggregation calibrated" in second and "perturb time" in second


def test_thumbnails_are_written_once_and_shared(run, gallery, tmp_path):
    thumbs = sorted((gallery / "img").iterdir())
    # 7 training images (the two query images among them) and 2 query images at their own size
    assert len(thumbs) == 7 + 2 + 2  # + 2 replicas of the audit
    pages = [_query_page(gallery, r.query_id) for r in run["results"]]
    by_id = [dict(zip(p.attr("img", "alt")[1:], p.attr("img", "src")[1:])) for p in pages]
    assert by_id[0] == by_id[1]  # the same file on both pages
    before = {p.name: p.stat().st_mtime_ns for p in thumbs}
    time.sleep(0.01)
    write_gallery(run["run_dir"], gallery, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (gallery / "img").iterdir()} == before  # not rewritten
    # identical images share one thumbnail
    shutil.copy(run["data"] / "a" / "img_000.png", tmp_path / "twin.png")
    thumbnails = Thumbnails(tmp_path / "out")
    assert thumbnails(run["data"] / "a" / "img_000.png").src == thumbnails(tmp_path / "twin.png").src
    assert len(list((tmp_path / "out" / "img").iterdir())) == 1
    # a training folder changed since the run is refused: its thumbnails would sit beside other images' scores
    copy = tmp_path / "copy"
    shutil.copytree(run["data"], copy)
    shutil.copy(copy / "a" / "img_000.png", copy / "a" / "img_002.png")
    with pytest.raises(DiffattrError, match="has changed since the run"):
        write_gallery(run["run_dir"], tmp_path / "out", train=copy, progress=False)


def test_hostile_captions_file_names_and_prompts_show_as_text(run, gallery):
    for name, page in _pages(gallery).items():
        for raw in (HOSTILE, HOSTILE_SCRIPT, "<img src=x onerror=alert(1)>", "<b>7</b>"):
            assert raw not in page.raw, (name, raw)
        assert "<script" not in page.raw.lower()
        assert not [attrs for _, attrs in page.tags if "onerror" in attrs]
        assert sum(tag == "img" for tag, _ in page.tags) == len(page.attr("img", "src"))
    query_texts = [_query_page(gallery, r.query_id).text for r in run["results"]]
    for text in query_texts:
        assert HOSTILE in text and HOSTILE_SCRIPT in text and HOSTILE_ID in text  # visible, as text
    assert "&lt;img src=x onerror=&#34;window.pwned=1;alert(1)&#34;&gt;" in _pages(gallery)["audit.html"].raw


def test_zero_queries(tmp_path):
    run_dir = tmp_path / "run"
    config = {"model": {}, "data": {"root": str(tmp_path / "gone"), "num_images": 3}, "scoring": {}}
    write_json(run_dir / "config.json", config)
    index = write_gallery(run_dir, progress=False)
    assert index == run_dir / "gallery" / "index.html"
    page = Page(index)
    assert "No queries in this run directory yet" in page.text and not page.attr("img", "src")
    assert list(index.parent.glob("*.html")) == [index]


def write_run(run_dir: Path, data: Path, *, num_queries: int, top: int, seed=0) -> list[str]:
    """Writes a run directory by hand, as ``Attributor`` would, with random scores and deltas."""
    ids = [p.relative_to(data).as_posix() for p in sorted(data.rglob("*.png"))]
    generator = torch.Generator().manual_seed(seed)
    timesteps = torch.tensor([5, 15, 25, 35, 45, 55, 65, 75, 85, 95])
    store = RunDirectory(run_dir)
    store.check_or_write_config({"model": {}, "data": {"root": str(data), "num_images": len(ids)}, "scoring": {}})
    write_json(run_dir / "ids.json", ids)
    store.save_tensors(run_dir / "baseline.safetensors", {"baseline": torch.rand(len(ids), 10), "timesteps": timesteps})
    query_ids = []
    for q in range(num_queries):
        query_id = f"sample{q}-0000000{q}"
        scores = torch.randn(len(ids), generator=generator)
        deltas = torch.randn(len(ids), 10, generator=generator) * 1e-3
        query_image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1000 + q)) * 2 - 1
        order = torch.sort(scores, descending=True, stable=True).indices[:top].tolist()
        entries = [
            {"rank": r, "id": ids[i], "score": float(scores[i]), "text": f"caption of {ids[i]}", "label": None}
            for r, i in enumerate(order, start=1)
        ]
        record = {"query": f"/gen/sample{q}.png", "query_id": query_id, "top": entries}
        store.save_result(query_id, record, {"scores": scores, "deltas": deltas}, query_image)
        query_ids.append(query_id)
    return query_ids


def test_one_query(tmp_path):
    data = write_images(tmp_path / "data", 5, labels=False)
    (query_id,) = write_run(tmp_path / "run", data, num_queries=1, top=3)
    out = write_gallery(tmp_path / "run", tmp_path / "site", progress=False).parent
    page = _query_page(out, query_id)
    assert len(page.attr("img", "src")) == 1 + 3 and "sample0.png" in page.text
    # no label in metadata.jsonl: the class sub-folders' (a → 0, b → 1)
    ranked = page.text.split("Top 3")[1]
    assert "image 0 label 0" in ranked and "image 1 label 1" in ranked and "image 2 label 0" in ranked
    links = Page(out / "index.html").attr("a", "href")
    assert [a for a in links if a.startswith("query-")] == [f"query-{query_id}.html"]
    # more than result.json lists: taken from scores.safetensors, captions from metadata.jsonl
    out = write_gallery(tmp_path / "run", tmp_path / "site5", top_k=5, progress=False).parent
    page = _query_page(out, query_id)
    assert len(page.attr("img", "src")) == 1 + 5 and "Top 5 training images" in page.text
    assert page.raw.count('class="caption"') == 5  # 3 from result.json, 2 from metadata.jsonl


def test_thousand_training_images(tmp_path):
    data = write_images(tmp_path / "data", 1000)
    query_ids = write_run(tmp_path / "run", data, num_queries=2, top=10)
    start = time.perf_counter()
    out = write_gallery(tmp_path / "run", top_k=1000, progress=False).parent
    seconds = time.perf_counter() - start
    pages = [_query_page(out, q) for q in query_ids]
    assert all(len(p.attr("img", "src")) == 1 + 1000 for p in pages)
    assert set(pages[0].attr("img", "src")[1:]) == set(pages[1].attr("img", "src")[1:])
    assert len(list((out / "img").iterdir())) == 1000 + 2  # each training image once, plus 2 queries
    assert "all 1000 images, mean" in pages[0].text and "top-1000 mean" in pages[0].text
    assert "#1000" in pages[0].text
    assert seconds < 30, f"{seconds:.1f}s for 2 × 1000 images"


def test_delta_plot_draws_top_k_against_all_images():
    timesteps = torch.tensor([10.0, 50.0, 90.0])
    deltas = torch.zeros(20, 3)
    deltas[7] = torch.tensor([1.0, 2.0, 3.0])  # the top-1 rises most
    deltas[3] = torch.tensor([0.0, 1.0, 1.0])
    plot = delta_plot(timesteps, deltas, [7, 3])
    names = [s["name"] for s in plot["series"]]
    assert names == ["all 20 images, mean", "top-2 mean", "top-1"]
    ys = {s["css"]: [y for _, y in s["dots"]] for s in plot["series"]}
    assert ys["top1"][2] < ys["top"][2] < ys["all"][2]  # SVG y grows downward
    xs = [x for x, _ in plot["series"][0]["dots"]]
    assert xs == sorted(xs) and plot["left"] <= xs[0] and xs[-1] <= plot["right"]
    assert all(0 <= y <= plot["height"] for s in ys.values() for y in s)
    assert 0 <= ys["all"][0] < plot["zero"] < plot["bottom"]  # mean Δ at t=10 is 0.05 > 0
    assert [label for _, label in plot["xticks"]] == ["10", "50", "90"]
    single = delta_plot(torch.tensor([500.0]), torch.ones(4, 1), [0])  # one timestep, one image shown
    assert [s["name"] for s in single["series"]] == ["all 4 images, mean", "top-1"]


def test_clip_similarity_beside_each_score(run, tmp_path):
    from diffattr.clip import ClipEmbedder

    clip = ClipEmbedder(str(DATA / "diffattr-tiny-clip.json"), None)
    out = write_gallery(run["run_dir"], tmp_path, top_k=3, clip=clip, progress=False).parent
    result = run["results"][1]
    page = _query_page(out, result.query_id)
    query = load_image(run["run_dir"] / "queries" / result.query_id / "query.png", resolution=16, channels=3)
    train = torch.stack([load_image(run["data"] / i, resolution=16, channels=3) for i in result.top_ids[:3]])
    similarity = (clip.embed(query[None]) @ clip.embed(train).T)[0].tolist()
    look_rank = {i: r for r, i in enumerate(sorted(range(3), key=lambda i: -similarity[i]), start=1)}
    for i, entry in enumerate(result.top[:3]):
        card = f"#{i + 1} {format_number(entry['score'])} CLIP {format_number(similarity[i], 3)} (#{look_rank[i]})"
        assert card in page.text
    assert "CLIP (diffattr-tiny-clip) cosine similarity" in page.text


def test_audit_page_ranks_memorized_images_beside_their_replicas(run, gallery):
    page = _pages(gallery)["audit.html"]
    text = page.text
    assert 'href="audit.html"' in (gallery / "index.html").read_text()
    order = [text.index(f"#{r} ") for r in (1, 2, 3, 4)]
    assert order == sorted(order)
    assert "#1 a/img_000.png score 3.25 loss_gap 1.5 replica_count 2" in text
    assert "replicas (2) replicas/0003.png rank1: true distance: 0.125" in text
    assert "replicas/<b>7</b>.png rank1: false" in text  # a hostile replica file name, as text
    assert "copies (2) b/img_001.png b/img_003.png" in text  # training ids: their images
    assert "nearest (2) b/img_003.png distance: 0 a/img_002.png distance: 2.5" in text
    assert "loss_per_timestep [0.0123, 0.5, 1]" in text
    assert "signals loss_gap robust z-score of the baseline loss replicas" in text
    assert f"note {HOSTILE_SCRIPT}" in text
    assert f"#2 {HOSTILE_ID} score 1.5 loss_gap null" in text
    assert "#4 b/img_005.png score — replicas []" in text  # missing id, missing score, empty evidence
    assert "alpha" in text and HOSTILE in text  # the report's other fields, under "About this audit"
    alts = page.attr("img", "alt")
    replicas = ["replicas/0003.png", "replicas/<b>7</b>.png"]
    copies, nearest = ["b/img_001.png", "b/img_003.png"], ["b/img_003.png", "a/img_002.png"]
    assert alts == ["a/img_000.png", *replicas, *copies, *nearest, HOSTILE_ID, "b/img_005.png"]
    assert "#3 score 0.75" in text and "no id" in page.raw


def test_names_that_leave_their_folder_are_refused(run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run["run_dir"], run_dir)
    report = read_json(run_dir / "audit" / "report.json")
    report["ranking"][0]["evidence"]["replicas"][0]["file"] = "../../../etc/passwd"
    RunDirectory(run_dir).save_json(run_dir / "audit" / "report.json", report)
    with pytest.raises(DiffattrError, match=r"evidence file '\.\./\.\./\.\./etc/passwd' points outside"):
        write_gallery(run_dir, progress=False)
    shutil.rmtree(run_dir / "audit")
    result_file = next((run_dir / "queries").glob("*/result.json"))
    result = read_json(result_file)
    result["top"][0]["id"] = "../../outside.png"
    write_json(result_file, result)  # its stamp kept, but it no longer matches the edited record
    with pytest.raises(DiffattrError, match="computed under other settings"):
        write_gallery(run_dir, progress=False)


def test_missing_training_folder_shows_placeholders_and_train_flag_fixes_it(run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run["run_dir"], run_dir)
    config = read_json(run_dir / "config.json")
    config["data"]["root"] = str(tmp_path / "moved")
    write_json(run_dir / "config.json", config)
    index = write_gallery(run_dir, progress=False)
    assert "7 training images were not found" in Page(index).text
    page = Page(index.parent / f"query-{run['results'][0].query_id}.html")
    assert len(page.attr("img", "src")) == 1 and page.raw.count("image not found") == 7
    index = write_gallery(run_dir, train=run["data"], progress=False)
    assert "not found" not in Page(index).text


def test_page_names_are_safe_in_urls():
    assert _page_name("sample_seed0-1a2b3c4d") == "query-sample_seed0-1a2b3c4d.html"
    for name in ("a b", "x#y?z", "..", '"><script>', "é", "a/b"):
        assert re.fullmatch(r"query-[0-9a-f]{16}\.html", _page_name(name)), name


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, r"--run-dir .*missing: no such folder"),
        (lambda p: p.write_text("x"), r"--run-dir .*missing is not a folder"),
        (lambda p: p.mkdir(), r"--run-dir .*missing is not a diffattr run directory \(no config\.json\)"),
    ],
)
def test_invalid_run_directory_is_a_clear_error(tmp_path, make, message):
    make(tmp_path / "missing")
    with pytest.raises(DiffattrError, match=message):
        write_gallery(tmp_path / "missing", progress=False)


def test_cli(run, tmp_path, capsys):
    out = tmp_path / "site"
    assert main(["gallery", "--run-dir", str(run["run_dir"]), "--out", str(out), "--top-k", "2", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"gallery: {out / 'index.html'}"
    assert len(_query_page(out, run["results"][0].query_id).attr("img", "src")) == 1 + 2
    assert main(["gallery", "--run-dir", str(tmp_path / "nope")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("diffattr: error: --run-dir")
    assert main(["gallery", "--run-dir", str(run["run_dir"]), "--clip-weights", str(tmp_path / "none.pt")]) == 2
    assert "--clip-weights" in capsys.readouterr().err
    assert main(["gallery", "--run-dir", str(run["run_dir"]), "--top-k", "0"]) == 2
    assert "--top-k 0: must be at least 1" in capsys.readouterr().err


def test_cli_with_clip_weights(run, tmp_path, capsys):
    import open_clip
    from safetensors.torch import save_file

    config = DATA / "diffattr-tiny-clip.json"
    open_clip.add_model_config(config)
    weights = tmp_path / "tiny-clip.safetensors"
    save_file(open_clip.create_model(config.stem).state_dict(), weights)
    args = ["gallery", "--run-dir", str(run["run_dir"]), "--out", str(tmp_path / "site"), "--quiet"]
    assert main([*args, "--clip-model", str(config), "--clip-weights", str(weights), "--device", "cpu"]) == 0
    page = _query_page(tmp_path / "site", run["results"][0].query_id)
    assert page.text.count("CLIP ") >= 7
