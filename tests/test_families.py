"""Every model family on its tiny offline fixture (``tests/families.py``): SDXL, DiT, PixArt and
SD3 (flow matching) run cache → attribute → gallery, the audit and a baseline from the command
line, and a training image used as its own query ranks itself first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffattr import DiffusionModel
from diffattr.cli import main
from diffattr.demo import toy_paths
from diffattr.errors import DiffattrError

from .families import FAMILIES, build

TRAIN_STEPS = {"sdxl": 300, "dit": 300, "pixart": 600, "sd3": 600}  # the transformers learn slower
QUERIES = 4
FAST = ["--quiet", "--device", "cpu", "--timesteps", "4", "--aggregation", "loss"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """Two captioned, labelled toy digits (16x16) of each class, in an imagefolder with metadata.jsonl."""
    root = tmp_path_factory.mktemp("digits")
    toy = toy_paths()["train"]
    rows = [json.loads(line) for line in (toy / "metadata.jsonl").read_text().splitlines() if line.strip()]
    digit_rows, per_label = [], {}
    for row in rows:
        if row["file_name"].startswith("digits/") and per_label.get(row["label"], 0) < 2:
            per_label[row["label"]] = per_label.get(row["label"], 0) + 1
            digit_rows.append(row)
    rows = digit_rows
    for row in rows:
        (root / row["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(toy / row["file_name"], root / row["file_name"])
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def _rows(digits: Path) -> list[dict]:
    return [json.loads(line) for line in (digits / "metadata.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, digits) -> dict[str, Path]:
    """Each family's pipeline folder, quick-trained on the digits with their labels or captions."""
    rows = _rows(digits)
    images = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(digits / row["file_name"]).convert("RGB"), np.float32) / 127.5 - 1)
            .permute(2, 0, 1)
            .contiguous()
            for row in rows
        ]
    )
    root = tmp_path_factory.mktemp("families")
    torch.manual_seed(0)
    return {
        family: build(
            family,
            root / family,
            images=images,
            labels=[row["label"] for row in rows] if family == "dit" else None,
            prompts=None if family == "dit" else [row["text"] for row in rows],
            train_steps=TRAIN_STEPS[family],
        )
        for family in FAMILIES
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_every_verb_runs_and_a_training_image_ranks_itself_first(family, fixtures, digits, tmp_path, capsys):
    model, run = fixtures[family], tmp_path / "run"
    common = ["--model", model, "--train", digits, "--run-dir", run, *FAST]
    assert main(["cache", *map(str, common)]) == 0
    queries = _rows(digits)[:: len(_rows(digits)) // QUERIES][:QUERIES]
    condition = "--label" if family == "dit" else "--prompt"
    flags = []
    for row in queries:
        flags += [
            "--query",
            str(digits / row["file_name"]),
            condition,
            str(row["label"] if family == "dit" else row["text"]),
        ]
    assert main(["attribute", *map(str, common), *flags, "--top-k", "3"]) == 0
    tops = {}
    for folder in (run / "queries").iterdir():
        result = json.loads((folder / "result.json").read_text())
        if result["method"] == "forward-inf":
            tops[Path(result["query"]).relative_to(digits).as_posix()] = result["top"][0]["id"]
    assert tops == {row["file_name"]: row["file_name"] for row in queries}
    (query,) = flags[1:2]
    baseline = ["--query", query, condition, flags[3], "--method", "dtrak", "--projection-dim", "8"]
    assert main(["attribute", *map(str, common), *baseline]) == 0
    assert main(["audit", *map(str, common), "--samples", "2", "--sampling-steps", "3"]) == 0
    assert json.loads((run / "audit" / "report.json").read_text())["ranking"]
    capsys.readouterr()
    assert main(["gallery", "--run-dir", str(run), "--quiet"]) == 0
    assert len(list((run / "gallery").glob("query-*.html"))) == QUERIES + 1


def test_families_are_told_apart_and_flow_matching_follows_the_scheduler(fixtures):
    loaded = {family: DiffusionModel.from_pretrained(fixtures[family], device="cpu") for family in FAMILIES}
    assert {family: model.family for family, model in loaded.items()} == {
        "sdxl": "sdxl-unet",
        "dit": "dit",
        "pixart": "pixart",
        "sd3": "sd3",
    }
    sd3 = loaded["sd3"]
    assert sd3.prediction_type == "flow_matching" and loaded["sdxl"].prediction_type == "epsilon"
    clean, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([0, 999])
    sigma = sd3._sigma(t)
    assert 0 < sigma[0] < 0.01 and sigma[1] == pytest.approx(1.0)  # SD3's shifted σ, ascending in t
    torch.testing.assert_close(sd3.add_noise(clean, noise, t)[1], noise[1])
    torch.testing.assert_close(sd3.target(clean, noise, t), noise - clean)
    torch.testing.assert_close(sd3.network_timesteps(t), sigma * 1000)


@pytest.mark.parametrize("family", ["sdxl", "pixart", "sd3", "sd3-without-t5"])
def test_conditions_are_what_the_pipeline_itself_encodes(family, tmp_path):
    """The prompt conditions equal the pipeline's own ``encode_prompt`` (and SDXL's time ids):
    the conditioning scored is the one the model was trained and samples with."""
    from diffattr.denoisers import unpack
    from diffattr.models import load_pipeline

    from .families import BUILDERS, _sd3

    pipe = _sd3(t5=False) if family == "sd3-without-t5" else BUILDERS[family]()
    model = load_pipeline(pipe, device="cpu")
    prompts = ["a handwritten digit zero", "<b>Ünïcode & an unknown word</b>", ""]
    parts = unpack(model.conditions(["a", "b", "c"], prompts=prompts), model._shapes())
    with torch.no_grad():
        if family == "sdxl":
            hidden, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
            size = (model.resolution, model.resolution)
            projection = pipe.text_encoder_2.config.projection_dim
            time_ids = pipe._get_add_time_ids(size, (0, 0), size, torch.float32, text_encoder_projection_dim=projection)
            expected = [hidden, pooled, time_ids.expand(len(prompts), 6)]
        elif family == "pixart":
            hidden, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=300)
            expected = [hidden, mask.float()]
            assert mask.sum(1).tolist()[0] == 5  # T5 pieces: 4 words and </s>
        else:
            hidden, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False)
            expected = [hidden, pooled]
            if family == "sd3-without-t5":  # T5's zero tokens are not stored, but reach the network
                assert hidden[:, 16:].abs().sum() == 0
                expected = [hidden[:, :16], pooled]
                seen = {}
                spy = lambda noisy, **inputs: seen.update(inputs) or type("Out", (), {"sample": noisy})  # noqa: E731
                model.call_network(
                    torch.zeros(3, 4, 8, 8), torch.zeros(3), model.conditions([0, 1, 2], prompts=prompts), network=spy
                )
                torch.testing.assert_close(seen["encoder_hidden_states"], hidden)
    assert len(parts) == len(expected)
    for part, want in zip(parts, expected):
        torch.testing.assert_close(part, want.float(), rtol=1e-5, atol=1e-6)


def test_a_pipeline_missing_a_component_its_family_needs_is_named(fixtures, tmp_path):
    broken = tmp_path / "sdxl"
    shutil.copytree(fixtures["sdxl"], broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": [None, None]}))
    with pytest.raises(DiffattrError, match=r"sdxl-unet\) also needs \['text_encoder_2'\]"):
        DiffusionModel.from_pretrained(broken, device="cpu")
    with pytest.raises(DiffattrError, match="diffusers has no load_lora_weights for DiTTransformer2DModel"):
        DiffusionModel.from_pretrained(fixtures["dit"], lora=tmp_path, device="cpu")


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_a_lora_adapter_is_fused_through_the_pipelines_own_loader(family, fixtures, tmp_path):
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffattr.models import load_pipeline

    pipeline_class = {"sdxl": diffusers.StableDiffusionXLPipeline, "sd3": diffusers.StableDiffusion3Pipeline}[family]
    pipeline = pipeline_class.from_pretrained(fixtures[family], local_files_only=True)
    network_name = "unet" if family == "sdxl" else "transformer"
    network = getattr(pipeline, network_name)
    network.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: an adapter that changes nothing
                parameter.normal_(std=0.2)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(network))
    pipeline_class.save_lora_weights(tmp_path / "lora", **{f"{network_name}_lora_layers": layers})
    adapted = load_pipeline(pipeline, device="cpu")  # the adapter active, unfused
    fused = DiffusionModel.from_pretrained(fixtures[family], lora=tmp_path / "lora", device="cpu")
    base = DiffusionModel.from_pretrained(fixtures[family], device="cpu")
    noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    conditions = base.conditions(["a", "b"], prompts=["a handwritten digit three", ""])
    with torch.no_grad():
        expected = adapted.predict(noisy, t, conditions)
        torch.testing.assert_close(fused.predict(noisy, t, conditions), expected, atol=1e-4, rtol=1e-4)
        assert (base.predict(noisy, t, conditions) - expected).abs().max() > 1e-2
    assert fused.fingerprint != base.fingerprint


def test_a_weight_variant_is_loaded_by_name(fixtures, tmp_path):
    import diffusers

    diffusers.DiTPipeline.from_pretrained(fixtures["dit"], local_files_only=True).save_pretrained(
        tmp_path / "dit", variant="fp16"
    )
    assert list((tmp_path / "dit" / "transformer").glob("*.fp16.safetensors"))
    base = DiffusionModel.from_pretrained(fixtures["dit"], device="cpu")
    variant = DiffusionModel.from_pretrained(tmp_path / "dit", variant="fp16", device="cpu")
    for (name, expected), actual in zip(base.network.state_dict().items(), variant.network.state_dict().values()):
        assert torch.equal(expected, actual), name
    with pytest.raises(DiffattrError, match="transformer folder .* cannot load the model"):
        DiffusionModel.from_pretrained(tmp_path / "dit", device="cpu")
