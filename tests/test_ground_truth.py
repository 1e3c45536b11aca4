"""Rankings on ground truth, with the bundled toy model (16×16 digits, 4 canaries × 30 copies).

These are the claims the product makes, each of which can fail: a training image used as a query
must find itself (or an identical copy) first, and a generated replica of a planted canary must be
attributed to that canary.
"""

import pytest
import torch

from diffattr import Attributor, DiffusionModel
from diffattr.data import load_image, save_image
from diffattr.demo import toy_paths
from diffattr.sampling import generate
from diffattr.store import read_json


@pytest.fixture(scope="module")
def toy():
    paths = toy_paths()
    return paths, DiffusionModel.from_pretrained(paths["model"], device="cpu")


@pytest.fixture(scope="module")
def attributor(toy, toy_run_dir):
    paths, model = toy
    return Attributor(model, paths["train"], toy_run_dir, progress=False)


def _same_pixels(attributor, id_a, id_b):
    root = attributor.data.root
    return torch.equal(
        load_image(root / id_a, resolution=16, channels=1), load_image(root / id_b, resolution=16, channels=1)
    )


def test_training_images_used_as_queries_rank_themselves_first(attributor):
    ids = attributor.ids
    queries = [ids[i] for i in range(0, len(ids), len(ids) // 10)][:10]
    assert sum(q.startswith("canaries/") for q in queries) >= 1  # both kinds are covered
    results = attributor.attribute([attributor.data.root / q for q in queries], top_k=1)
    hits = [_same_pixels(attributor, query, result.top_ids[0]) for query, result in zip(queries, results)]
    assert sum(hits) >= 9, list(zip(queries, [r.top_ids[0] for r in results]))


def test_generated_replica_of_a_canary_is_attributed_to_it(toy, attributor, tmp_path):
    paths, model = toy
    seed, canary_id = next(iter(read_json(paths["demo"])["replicas"].items()))
    sample = generate(model, seeds=[int(seed)], progress=False)[0]
    canary = load_image(paths["train"] / canary_id, resolution=16, channels=1)
    assert (sample - canary).pow(2).mean() < 0.05, "the bundled model no longer replicates this canary"
    save_image(sample, tmp_path / "replica.png")
    (result,) = attributor.attribute(tmp_path / "replica.png", top_k=3)
    group = canary_id.split("_")[0]  # canaries/canaryJ
    assert result.top_ids[0].startswith(group + "_"), result.top
