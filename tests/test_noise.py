import pytest
import torch

from diffattr import DiffattrError
from diffattr.noise import draw_noise, noise_key, timestep_grid


def test_timestep_grid_is_bin_centres():
    assert timestep_grid(1000, 10).tolist() == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    assert timestep_grid(100, 1).tolist() == [50]
    with pytest.raises(DiffattrError, match="--timesteps 101: must be between 1 and the scheduler's 100"):
        timestep_grid(100, 101)


def test_noise_key_depends_on_every_coordinate():
    keys = {
        noise_key(0, "a.png", 0, 0),
        noise_key(1, "a.png", 0, 0),
        noise_key(0, "b.png", 0, 0),
        noise_key(0, "a.png", 1, 0),
        noise_key(0, "a.png", 0, 1),
    }
    assert len(keys) == 5
    assert noise_key(0, "a.png", 3, 2) == noise_key(0, "a.png", 3, 2)
    assert all(0 <= key < 2**63 for key in keys)


def test_noise_of_a_key_does_not_depend_on_its_batch():
    keys = [noise_key(7, f"img{i}", k, 0) for i in range(5) for k in range(3)]
    together = draw_noise(keys, (1, 4, 4))
    alone = torch.cat([draw_noise([key], (1, 4, 4)) for key in reversed(keys)]).flip(0)
    assert torch.equal(together, alone)
    assert not torch.equal(together[0], together[1])
