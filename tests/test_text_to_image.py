"""Latent text-to-image models (Stable-Diffusion style), with and without a LoRA adapter.

The bundled tiny pipeline (``assets/tiny-sd``, built by ``scripts/make_tiny_sd.py``) was trained on
the toy digits with captions "a handwritten digit three"; its LoRA adapter on 4 exemplars of a new
style captioned "a handwritten digit in sks style" (``assets/tiny-sd/concept``).
"""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffattr import AttributionConfig, Attributor, DiffusionModel, ScoringConfig
from diffattr.cli import main
from diffattr.data import save_image
from diffattr.demo import assets_dir, toy_paths
from diffattr.errors import DiffattrError
from diffattr.metrics import mean_average_precision, recall_at_k
from diffattr.perturb import perturbed_copy
from diffattr.sampling import generate

TINY_SD = assets_dir() / "tiny-sd"
MODEL, LORA, CONCEPT = TINY_SD / "model", TINY_SD / "lora", TINY_SD / "concept"
SKS = "a handwritten digit in sks style"
FAST = AttributionConfig(aggregation="loss")


@pytest.fixture(scope="module")
def sd_model():
    return DiffusionModel.from_pretrained(MODEL, device="cpu")


@pytest.fixture(scope="module")
def lora_model():
    return DiffusionModel.from_pretrained(MODEL, lora=LORA, device="cpu")


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """10 digits per class and 3 copies of a canary from the toy set, plus the 4 concept exemplars."""
    root = tmp_path_factory.mktemp("captioned")
    toy = toy_paths()["train"]
    canary_copies = {f"canaries/canary0_copy0{c}.png" for c in range(3)}
    rows, per_label = [], {}
    for line in (toy / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["file_name"].startswith("digits/") and per_label.get(row["label"], 0) < 10:
            per_label[row["label"]] = per_label.get(row["label"], 0) + 1
        elif row["file_name"] not in canary_copies:
            continue
        rows.append(row)
    for row in rows:
        (root / row["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(toy / row["file_name"], root / row["file_name"])
    for line in (CONCEPT / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        (root / "concept").mkdir(exist_ok=True)
        shutil.copy(CONCEPT / row["file_name"], root / "concept" / row["file_name"])
        rows.append({**row, "file_name": f"concept/{row['file_name']}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_the_pipeline_loads_with_its_text_side(sd_model):
    assert sd_model.is_latent and sd_model.is_text_conditioned and sd_model.num_classes is None
    assert sd_model.resolution == 16 and sd_model.channels == 3 and sd_model.sample_shape == (4, 8, 8)


def test_encodings_are_the_scaled_vae_mean_and_decode_inverts_them(sd_model):
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    expected = sd_model.vae.encode(image).latent_dist.mean * sd_model.vae.config.scaling_factor
    encoded = sd_model.encode(image)
    assert torch.allclose(encoded, expected) and torch.equal(encoded, sd_model.encode(image))  # mean, not a sample
    digit = generate(sd_model, seeds=[0], prompts=["a handwritten digit three"], num_inference_steps=20, progress=False)
    assert torch.allclose(sd_model.encode(sd_model.decode(digit)), digit, atol=0.5)


def test_prompts_condition_the_model(sd_model):
    conditions = sd_model.conditions(["a", "b"], prompts=["a handwritten digit three", None])
    assert conditions.shape == (2, sd_model.tokenizer.model_max_length, sd_model.text_encoder.config.hidden_size)
    assert torch.equal(conditions[1], sd_model.encode_prompts([""])[0])  # no caption: the empty prompt
    assert not torch.allclose(conditions[0], conditions[1])


def test_a_lora_adapter_is_fused_exactly(sd_model, lora_model):
    assert lora_model.fingerprint != sd_model.fingerprint
    assert not any("lora" in name for name, _ in lora_model.network.named_parameters())
    pipeline = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    pipeline.load_lora_weights(LORA)
    noisy, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([100, 700])
    conditions = sd_model.conditions(["a", "b"], prompts=[SKS, "a handwritten digit one"])
    with torch.no_grad():
        expected = pipeline.unet(noisy, t, encoder_hidden_states=conditions).sample
        base = sd_model.predict(noisy, t, conditions)
    assert torch.allclose(lora_model.predict(noisy, t, conditions), expected, atol=1e-5)
    assert not torch.allclose(base, expected, atol=1e-3)


@pytest.mark.parametrize(
    ("params", "moved"),
    [("cross-attention-kv", r"attn2\.to_[kv]\.weight$"), ("lora", "lora_")],
)
def test_perturbation_choices_move_only_their_parameters(sd_model, params, moved):
    import re

    before = {name: p.clone() for name, p in sd_model.network.named_parameters()}
    query = sd_model.encode(torch.zeros(1, 3, 16, 16))[0]
    condition = sd_model.conditions(["q"], prompts=[SKS])
    config = AttributionConfig(params=params, steps=2, learning_rate=1e-2, draws_per_step=4)
    copy, *_ = perturbed_copy(sd_model, query, condition, config, seed=0)
    original = {name: before.get(name.replace(".base_layer", "")) for name, _ in copy.named_parameters()}
    changed = [
        name for name, p in copy.named_parameters() if original[name] is None or not torch.equal(p, original[name])
    ]
    assert changed and all(re.search(moved, name) for name in changed)
    assert all(torch.equal(p, before[name]) for name, p in sd_model.network.named_parameters())  # model untouched
    noisy, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    assert not torch.allclose(
        sd_model.predict(noisy, t, condition, network=copy), sd_model.predict(noisy, t, condition)
    )


def test_a_training_image_with_its_caption_is_attributed_to_itself(sd_model, captioned, tmp_path):
    attributor = Attributor(sd_model, captioned, tmp_path / "run", attribution=FAST, progress=False)
    records = [r for r in attributor.data.records if r.id.startswith("digits/")][::20]
    results = attributor.attribute([r.path for r in records], prompts=[r.text for r in records], top_k=3)
    assert sum(result.top_ids[0] == record.id for result, record in zip(results, records)) >= len(records) - 1
    encodings, conditions = attributor.training_encodings()
    assert encodings.shape == (len(attributor.ids), 4, 8, 8) and conditions.shape[0] == len(attributor.ids)
    (pixel,) = attributor.attribute(records[0].path, prompts=records[0].text, method="pixel")
    assert pixel.top_ids[0] == records[0].id  # the pixel baseline compares images, not latents


def test_generated_images_of_a_lora_concept_are_attributed_to_its_exemplars(lora_model, captioned, tmp_path):
    """The customization ground truth: the exemplars the adapter was trained on come out on top."""
    samples = lora_model.decode(
        generate(lora_model, seeds=[0, 1], prompts=[SKS] * 2, guidance_scale=3.0, progress=False)
    )
    queries = []
    for seed, image in enumerate(samples):
        queries.append(tmp_path / f"sks_{seed}.png")
        save_image(image, queries[-1])
        queries[-1].with_suffix(".txt").write_text(SKS)  # the prompt, from the sidecar file
    attributor = Attributor(lora_model, captioned, tmp_path / "run", progress=False)
    results = attributor.attribute(queries, top_k=10)
    scores = torch.stack([result.scores for result in results])
    exemplars = torch.tensor([image_id.startswith("concept/") for image_id in attributor.ids]).expand_as(scores)
    assert recall_at_k(scores, exemplars, 10) >= 0.75, [result.top_ids for result in results]
    assert mean_average_precision(scores, exemplars) >= 0.5


def test_a_query_without_a_prompt_or_with_a_label_is_refused(sd_model, captioned, tmp_path):
    query = tmp_path / "q.png"
    save_image(torch.zeros(3, 16, 16), query)
    attributor = Attributor(sd_model, captioned, tmp_path / "run", attribution=FAST, progress=False)
    with pytest.raises(DiffattrError, match=r"needs the query's prompt: pass --prompt, or write it to .*q\.txt"):
        attributor.attribute(query)
    with pytest.raises(DiffattrError, match="not class-conditional: drop --label"):
        attributor.attribute(query, prompts="a handwritten digit one", labels=1)


@pytest.mark.parametrize("lora", [True, False], ids=["with-lora", "without-lora"])
def test_cli_cache_attribute_audit_gallery(captioned, tmp_path, lora):
    common = ["--model", str(MODEL), "--train", str(captioned), "--run-dir", str(tmp_path), "--quiet"]
    common += ["--timesteps", "4", *(["--lora", str(LORA)] if lora else [])]
    assert main(["cache", *common]) == 0
    query = captioned / "concept" / "sks_1.png"
    prompt = 'a <b>"sks"</b> & digit'
    args = ["attribute", *common, "--query", str(query), "--prompt", prompt, "--aggregation", "loss", "--top-k", "3"]
    assert main(args) == 0
    (result_file,) = tmp_path.glob("queries/*/result.json")
    result = json.loads(result_file.read_text())
    assert result["prompt"] == prompt and result["top"][0]["id"].startswith("concept/")  # an exemplar of its style
    if lora:  # the fused model was trained on it
        assert result["top"][0]["id"] == "concept/sks_1.png"
    assert main(["audit", *common, "--samples", "4", "--sampling-steps", "10", "--aggregation", "loss"]) == 0
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert len(report["ranking"]) == len(list(captioned.rglob("*.png")))
    assert main(["gallery", "--run-dir", str(tmp_path), "--quiet"]) == 0
    pages = "".join(page.read_text() for page in (tmp_path / "gallery").glob("*.html"))
    assert "a &lt;b&gt;&#34;sks&#34;&lt;/b&gt; &amp; digit" in pages and prompt not in pages
    assert SKS in pages  # training captions


@pytest.mark.parametrize("method", ["tracin", "dtrak"])
def test_gradient_baselines_work_in_latent_space_under_the_captions(sd_model, captioned, tmp_path, method):
    attributor = Attributor(sd_model, captioned, tmp_path, scoring=ScoringConfig(num_timesteps=4), progress=False)
    record = next(r for r in attributor.data.records if r.id.startswith("concept/"))
    (result,) = attributor.attribute(record.path, prompts=record.text, method=method, top_k=5)
    assert result.scores.shape == (len(attributor.ids),) and torch.isfinite(result.scores).all()
    if method == "dtrak":
        assert result.top_ids[0] == record.id  # a training image is its own top-1 under D-TRAK
