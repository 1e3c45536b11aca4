"""Baselines (--method pixel / clip / tracin / dtrak) on a tiny model: shapes, determinism, a
planted duplicate found, features cached, and D-TRAK's kernel checked against a direct solve."""

import math
import shutil
from pathlib import Path

import pytest
import torch

from diffattr import Attributor
from diffattr.clip import ClipEmbedder
from diffattr.config import GradientConfig, ScoringConfig
from diffattr.errors import DiffattrError
from diffattr.gradients import Projector, kernel_scores
from diffattr.similarity import pixel_similarity

TINY_CLIP = Path(__file__).parent / "data" / "diffattr-tiny-clip.json"
QUERY_ID = "a/img_004.png"


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return ClipEmbedder(str(TINY_CLIP), None)


def _attributor(tiny_model, tiny_data, run_dir, clip=None, **gradient):
    return Attributor(
        tiny_model,
        tiny_data,
        run_dir,
        scoring=ScoringConfig(num_timesteps=4),
        gradient=GradientConfig(projection_dim=64, **gradient),
        clip=clip,
        progress=False,
    )


# TracIn is left out on purpose: its scores are dominated by gradient norms, and on this random
# model the duplicate is not its top-1 (the evaluation tables show the same); its correctness is
# checked against exact gradients below instead.
@pytest.mark.parametrize("method", ["pixel", "clip", "dtrak"])
def test_planted_duplicate_is_top1_and_scores_are_deterministic(tmp_path, tiny_model, tiny_data, clip, method):
    query = tmp_path / "query.png"
    shutil.copy(tiny_data / QUERY_ID, query)
    first = _attributor(tiny_model, tiny_data, tmp_path / "run", clip).attribute(query, method=method)[0]
    assert first.scores.shape == (12,) and first.deltas is None and first.method == method
    assert first.top_ids[0] == QUERY_ID
    again = _attributor(tiny_model, tiny_data, tmp_path / "other-run", clip).attribute(query, method=method)[0]
    assert torch.equal(first.scores, again.scores)
    folder = tmp_path / "run" / "queries" / first.query_id
    assert method in first.query_id and (folder / "result.json").is_file() and (folder / "query.png").is_file()


def test_dtrak_with_the_sparse_projection_finds_the_planted_duplicate(tmp_path, tiny_model, tiny_data):
    query = tmp_path / "query.png"
    shutil.copy(tiny_data / QUERY_ID, query)
    attributor = _attributor(tiny_model, tiny_data, tmp_path / "run", projection="sparse")
    result = attributor.attribute(query, method="dtrak")[0]
    assert result.top_ids[0] == QUERY_ID


def test_gradient_features_are_cached_per_setting(tmp_path, tiny_model, tiny_data):
    query = tiny_data / QUERY_ID
    _attributor(tiny_model, tiny_data, tmp_path).attribute(query, method="dtrak")
    cached = list((tmp_path / "methods").glob("dtrak-*/index.json"))
    assert len(cached) == 1
    # A new damping reuses the features (λ enters at query time); a new projection does not.
    _attributor(tiny_model, tiny_data, tmp_path, damping=math.inf).attribute(query, method="dtrak")
    assert list((tmp_path / "methods").glob("dtrak-*/index.json")) == cached
    other = Attributor(
        tiny_model,
        tiny_data,
        tmp_path,
        scoring=ScoringConfig(num_timesteps=4),
        gradient=GradientConfig(projection_dim=32),
        progress=False,
    )
    other.attribute(query, method="dtrak")
    assert len(list((tmp_path / "methods").glob("dtrak-*/index.json"))) == 2


def test_clip_method_needs_weights(tmp_path, tiny_model, tiny_data):
    with pytest.raises(DiffattrError, match="--clip-model and --clip-weights"):
        _attributor(tiny_model, tiny_data, tmp_path).attribute(tiny_data / QUERY_ID, method="clip")


def test_tracin_features_match_exact_gradients_computed_independently(tiny_model, tiny_data):
    """Projected TracIn inner products agree with inner products of full gradients computed here
    with diffusers' own ``add_noise`` and plain autograd."""
    from diffusers import DDPMPipeline

    from diffattr import DiffusionModel
    from diffattr.data import ImageFolder, load_image
    from diffattr.gradients import projected_gradients
    from diffattr.noise import draw_noise, noise_key, timestep_grid

    model = DiffusionModel.from_pretrained(tiny_model, device="cpu")
    records = ImageFolder(tiny_data).records[:6]
    images = torch.stack([load_image(r.path, resolution=8, channels=1) for r in records])
    ids = [r.id for r in records]
    grid = timestep_grid(model.num_train_timesteps, 3)
    features = projected_gradients(
        model,
        images,
        None,
        ids,
        method="tracin",
        timesteps=grid,
        seed=0,
        config=GradientConfig(projection_dim=4096),
        progress=False,
    )
    pipeline = DDPMPipeline.from_pretrained(tiny_model)
    unet = pipeline.unet.float()
    exact = []
    for image, image_id in zip(images, ids):
        noise = draw_noise([noise_key(0, image_id, k, 0) for k in range(3)], image.shape)
        noisy = pipeline.scheduler.add_noise(image.expand(3, -1, -1, -1), noise, grid)
        loss = torch.nn.functional.mse_loss(unet(noisy, grid).sample, noise)
        exact.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(unet.parameters()))]))
    exact = torch.stack(exact)
    exact_gram, projected_gram = exact @ exact.T, features @ features.T
    assert torch.allclose(projected_gram.diag(), exact_gram.diag(), rtol=0.15)
    assert torch.corrcoef(torch.stack([exact_gram.flatten(), projected_gram.flatten()]))[0, 1] > 0.98


def test_kernel_scores_match_a_direct_solve():
    generator = torch.Generator().manual_seed(0)
    phi, q = torch.randn(20, 6, generator=generator), torch.randn(3, 6, generator=generator)
    gram = (phi.T @ phi).double()
    lam = 0.5 * torch.linalg.eigvalsh(gram).mean()
    direct = q.double() @ torch.linalg.solve(gram + lam * torch.eye(6, dtype=torch.float64), phi.T.double())
    assert torch.allclose(kernel_scores(q, phi, damping=0.5).double(), direct, atol=1e-5)
    assert torch.allclose(kernel_scores(q, phi, damping=math.inf), q @ phi.T, atol=1e-5)


@pytest.mark.parametrize("kind", Projector.KINDS)
def test_projector_preserves_inner_products_and_ignores_chunking_and_caching(kind):
    generator = torch.Generator().manual_seed(0)
    grads = torch.randn(4, 3000, generator=generator)
    cpu = torch.device("cpu")
    a = Projector(3000, 2048, seed=1, device=cpu, chunk=1000, kind=kind)
    b = Projector(3000, 2048, seed=1, device=cpu, chunk=1000, kind=kind, max_cached_bytes=0)  # regenerated per call
    assert a.cached and not b.cached
    assert torch.equal(a(grads), b(grads))
    assert torch.equal(b(grads), b(grads))
    exact, projected = grads @ grads.T, a(grads) @ a(grads).T
    assert torch.allclose(projected.diag(), exact.diag(), rtol=0.15)
    assert not torch.allclose(a(grads), Projector(3000, 2048, seed=2, device=cpu, chunk=1000, kind=kind)(grads))


def test_sparse_projection_is_a_count_sketch():
    projector = Projector(5, 3, seed=0, device=torch.device("cpu"), kind="sparse")
    (buckets, signs), *_ = [block for _, block in projector.blocks()]
    dense = torch.zeros(5, 3)
    dense[torch.arange(5), buckets] = signs.float()
    grads = torch.randn(2, 5)
    assert torch.allclose(projector(grads), grads @ dense)


def test_pixel_similarity_is_negative_mean_squared_distance():
    queries, train = torch.zeros(1, 1, 2, 2), torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    assert pixel_similarity(queries, train, batch_size=1).tolist() == [[0.0, -1.0]]


def test_cli_method_flags(tmp_path, tiny_model, tiny_data, clip, capsys):
    from safetensors.torch import save_file

    from diffattr.cli import main

    weights = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, weights)
    common = ["--model", str(tiny_model), "--train", str(tiny_data), "--run-dir", str(tmp_path / "run")]
    common += ["--device", "cpu", "--quiet", "--timesteps", "3", "--query", str(tiny_data / QUERY_ID)]
    assert main(["attribute", *common, "--method", "dtrak", "--projection-dim", "32", "--damping", "inf"]) == 0
    assert (
        main(["attribute", *common, "--method", "clip", "--clip-model", str(TINY_CLIP), "--clip-weights", str(weights)])
        == 0
    )
    out = capsys.readouterr().out
    assert "(dtrak)" in out and "(clip)" in out and QUERY_ID in out
    assert (
        main(["attribute", *common, "--method", "clip", "--clip-model", str(TINY_CLIP), "--clip-weights", "nope.pt"])
        == 2
    )
    assert "--clip-weights nope.pt: no such file" in capsys.readouterr().err


def test_a_query_has_the_same_noise_under_every_setting_of_a_method(tmp_path, tiny_model, tiny_data, monkeypatch):
    from diffattr.baselines import DTrakScorer

    names = []
    featurise = DTrakScorer.featurise

    def recording(self, images, conditions, query_names, *, description):
        names.append((description, query_names))
        return featurise(self, images, conditions, query_names, description=description)

    monkeypatch.setattr(DTrakScorer, "featurise", recording)
    for damping in (math.inf, 0.5):
        _attributor(tiny_model, tiny_data, tmp_path / "run", damping=damping).attribute(
            tiny_data / QUERY_ID, method="dtrak"
        )
    query_names = [n for description, n in names if description == "queries"]
    assert len(query_names) == 2 and query_names[0] == query_names[1]


@pytest.mark.parametrize("method", ["pixel", "clip", "tracin", "dtrak"])
def test_baseline_scores_do_not_depend_on_the_shards_the_features_are_read_in(
    tmp_path, tiny_model, tiny_data, clip, method, monkeypatch
):
    """Features sharded five rows at a time (D-TRAK's ΦᵀΦ summed over shards) give the scores of one
    shard: the baselines read the training set a shard at a time, so their memory is flat in N."""
    query = tiny_data / QUERY_ID
    whole = _attributor(tiny_model, tiny_data, tmp_path / "whole", clip).attribute(query, method=method)[0]
    monkeypatch.setattr("diffattr.attributor.ENCODING_SHARD_ROWS", 5)
    sharded = _attributor(tiny_model, tiny_data, tmp_path / "sharded", clip).attribute(query, method=method)[0]
    if method in ("clip", "tracin", "dtrak"):
        (folder,) = (tmp_path / "sharded" / "methods").glob(f"{method}-*")
        assert len(list(folder.glob("*.safetensors"))) == 3  # 12 images: 5 + 5 + 2
    assert torch.allclose(sharded.scores, whole.scores, rtol=1e-5, atol=1e-6 * whole.scores.abs().max())
    assert sharded.top_ids == whole.top_ids


def test_an_interrupted_featurisation_resumes_after_its_last_shard(tmp_path, tiny_model, tiny_data, monkeypatch):
    query = tiny_data / QUERY_ID
    monkeypatch.setattr("diffattr.attributor.ENCODING_SHARD_ROWS", 5)
    done = _attributor(tiny_model, tiny_data, tmp_path / "done").attribute(query, method="dtrak")[0]
    import diffattr.gradients

    calls, real = [], diffattr.gradients.projected_gradients

    class Killed(Exception):
        pass

    def interrupted(*args, **kwargs):
        calls.append(len(args[1]))
        if calls == [5, 5]:  # killed during the second shard
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(diffattr.gradients, "projected_gradients", interrupted)
    with pytest.raises(Killed):
        _attributor(tiny_model, tiny_data, tmp_path / "run").attribute(query, method="dtrak")
    calls.clear()
    resumed = _attributor(tiny_model, tiny_data, tmp_path / "run").attribute(query, method="dtrak")[0]
    assert calls == [5, 2, 1]  # shards 2 and 3 of the training set, then the query: shard 1 was kept
    assert torch.equal(resumed.scores, done.scores)
