"""Customization with text (Wang et al. 2023, text-to-image): Recall@10 and mAP of the exemplars.

Protocol (toy scale, CPU):
- base model: the bundled tiny text-to-image pipeline (`assets/tiny-sd`: VAE, CLIP text encoder,
  conditional UNet), trained on the toy digits captioned "a handwritten digit three";
- 4 new concepts the base never saw, 4 exemplars each: held-out digits rendered inverted, framed,
  striped or over a checkerboard (as in `eval_customization.py`), each concept captioned with its
  own new token, "a handwritten digit in <token> style";
- per concept: a fresh LoRA adapter (rank 4, attention projections and ResNet convolutions, as
  `scripts/make_tiny_sd.py` found necessary at this size) trained on the base on its 4 exemplars
  with their caption, half of each batch being base training images with their captions (prior
  preservation), then fused — the customized model; 2 samples generated from it
  with that caption (guidance 3, 50 steps), decoded, quantized to 8 bits and encoded again: the
  queries, whose prompt is the caption;
- attribution with the customized model over training ∪ all 16 exemplars: the concept's own 4
  exemplars are the right answers; Recall@10 and mAP, mean over the 8 queries.
- the training side is a class-balanced subset of the base's training set (`--per-class`), to keep
  the CPU time reasonable; every method sees the same set.

Pixel ℓ2 compares decoded images; `latent ℓ2` compares VAE latents; CLIP needs `--clip-weights`.
Forward-INF is run with the perturbation choices that matter for text-to-image models: all UNet
weights (the default), cross-attention key/value only, and a fresh LoRA adapter.

    python benchmarks/eval_customization_text.py                # ~25 min on 2 CPU cores
"""

import argparse
import copy
import dataclasses
import json

import torch
from eval_customization import CONCEPTS, concept_exemplars
from protocol import DEFAULT, Setting, all_method_scores, default_name, retrieval_metrics, write_tables

from diffattr import DiffusionModel
from diffattr.data import ImageFolder, load_image
from diffattr.demo import assets_dir, toy_paths
from diffattr.engine import Queries, TrainingSet
from diffattr.sampling import generate
from diffattr.similarity import pixel_similarity
from diffattr.training import train_denoiser

TOKENS = {"inverted": "sks", "framed": "zwx", "striped": "qrp", "checker": "vlt"}


def caption(concept: str) -> str:
    """The exemplars' caption, and the prompt of the queries generated for the concept."""
    return f"a handwritten digit in {TOKENS[concept]} style"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=20, help="training digits per class on the training side")
    parser.add_argument("--exemplars", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2, help="generated queries per concept")
    parser.add_argument("--lora-steps", type=int, default=500)
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--no-gradients", action="store_true", help="skip TracIn and D-TRAK")
    parser.add_argument("--clip-model", default="ViT-B-32")
    parser.add_argument("--clip-weights", help="local open_clip checkpoint: adds the CLIP row")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args()


def settings() -> list[Setting]:
    replace = dataclasses.replace
    return [
        Setting(),
        Setting(replace(DEFAULT, params="cross-attention-kv")),
        Setting(replace(DEFAULT, params="cross-attention-kv", learning_rate=1e-3)),
        Setting(replace(DEFAULT, params="lora", learning_rate=1e-3)),
        Setting(replace(DEFAULT, params="lora", learning_rate=1e-2)),
    ]


def customized(base: DiffusionModel, train: TrainingSet, mine: torch.Tensor, *, name: str, args, seed: int):
    """The base with a fresh LoRA adapter trained on the exemplars (``mine``), fused into its weights."""
    from peft import LoraConfig

    unet = copy.deepcopy(base.network)
    targets = [*base.lora_targets, "conv1", "conv2"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"))
    # Exemplars repeated to weigh as much as the base images drawn beside them (prior preservation).
    prior = torch.tensor([not image_id.startswith("exemplars/") for image_id in train.ids])
    repeats = max(1, int(prior.sum()) // int(mine.sum()))
    latents = torch.cat([train.encodings[mine].repeat(repeats, 1, 1, 1), train.encodings[prior]])
    conditions = torch.cat([train.conditions[mine].repeat(repeats, 1, 1), train.conditions[prior]])
    train_denoiser(
        base,
        latents,
        network=unet,
        labels=conditions,
        parameters=[p for n, p in unet.named_parameters() if "lora_" in n],
        steps=args.lora_steps,
        batch_size=32,
        learning_rate=args.lora_lr,
        seed=seed,
        progress=not args.quiet,
        description=f"LoRA on {name}",
    )
    unet.fuse_lora()
    unet.unload_lora()
    return base.with_network(unet.requires_grad_(False).eval(), source=f"lora-{name}", fingerprint=name)


def quantized(images: torch.Tensor) -> torch.Tensor:
    """As if saved to an 8-bit PNG and read back."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def main(args):
    paths = toy_paths()
    base = DiffusionModel.from_pretrained(assets_dir() / "tiny-sd" / "model", device="cpu")
    counts, records = {}, []
    for record in ImageFolder(paths["train"]).records:
        if record.id.startswith("digits/") and counts.get(record.label, 0) < args.per_class:
            counts[record.label] = counts.get(record.label, 0) + 1
            records.append(record)
    train_pixels = torch.stack([load_image(r.path, resolution=16, channels=3) for r in records])
    exemplar_pixels, exemplar_ids, owner = concept_exemplars(args.exemplars)
    exemplar_pixels = exemplar_pixels.expand(-1, 3, -1, -1)  # the pipeline is RGB
    captions = [r.text for r in records] + [caption(o) for o in owner]
    pixels = torch.cat([train_pixels, exemplar_pixels])
    ids = [r.id for r in records] + exemplar_ids
    train = TrainingSet(base.encode(pixels), base.conditions(ids, prompts=captions), ids)
    owners = [None] * len(records) + owner
    clip = None
    if args.clip_weights:
        from diffattr.clip import ClipEmbedder

        clip = ClipEmbedder(args.clip_model, args.clip_weights)
        train_clip = clip.embed(pixels)
    per_concept = {}
    for c, concept in enumerate(CONCEPTS):
        mine = torch.tensor([o == concept for o in owners])
        model = customized(base, train, mine, name=concept, args=args, seed=c)
        prompt = caption(concept)
        seeds = list(range(100 * c, 100 * c + args.samples))
        latents = generate(
            model,
            seeds=seeds,
            prompts=[prompt] * len(seeds),
            guidance_scale=3.0,
            num_inference_steps=50,
            progress=not args.quiet,
        )
        query_pixels = quantized(model.decode(latents))
        names = [f"{concept}/seed{s}" for s in seeds]
        queries = Queries(model.encode(query_pixels), model.conditions(names, prompts=[prompt] * len(seeds)), names)
        scores, seconds = all_method_scores(
            model,
            train,
            queries,
            settings=settings(),
            gradient_methods=not args.no_gradients,
            progress=not args.quiet,
        )
        scores["latent ℓ2"] = scores.pop("pixel")
        scores["pixel"] = pixel_similarity(query_pixels, pixels)
        if clip is not None:
            from diffattr.clip import cosine_similarity

            scores["clip"] = cosine_similarity(clip.embed(query_pixels), train_clip)
        relevant = torch.tensor([[o == concept for o in owners]] * args.samples)
        per_concept[concept] = {"scores": scores, "relevant": relevant, "seconds": seconds}
    first = per_concept[next(iter(CONCEPTS))]["scores"]
    leading = ["pixel", "latent ℓ2", *(["clip"] if clip else [])]
    methods, rows = retrieval_metrics(per_concept, leading + [n for n in first if n not in leading])
    payload = {"concepts": {c: TOKENS[c] for c in CONCEPTS}, "methods": methods, "default": default_name()}
    payload["seconds"] = {c: v["seconds"] for c, v in per_concept.items()}
    payload["training_images"] = len(records)
    print(json.dumps(payload["seconds"]))
    write_tables("customization_text", payload, ["method", "Recall@10", "mAP"], rows, swept=True)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main(parse_args())
