"""The only gradients Forward-INF takes: a few bounded optimizer steps of a copy on the query.

Descent trains the copy on the query (the mirrored direction: training images that helped make
the query get easier too); ascent unlearns it. The caller's UNet is never touched.
"""

from __future__ import annotations

import copy
import re

import torch
from tqdm.auto import tqdm

from .config import AttributionConfig
from .denoisers import Denoiser, LatentTextUNet
from .errors import DiffattrError
from .losses import denoising_loss

_LORA_ADAPTER = "diffattr_query"
# Every family's named sets, for the hint when a name is known but this model lacks it.
_KNOWN_SETS = set(LatentTextUNet.parameter_groups)


def select_parameters(
    model: Denoiser, which: str, network: torch.nn.Module | None = None
) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters of ``network`` (default: the model's) that move: ``all``, one of the
    family's named sets (``attention``, ``cross-attention-kv``), ``lora`` (the projections a fresh
    adapter wraps), or those whose name matches a regular expression."""
    named = list((model.network if network is None else network).named_parameters())
    if which == "all":
        return named
    if which == "lora":
        chosen = [(n, p) for n, p in named if any(f".{t}.weight" in f".{n}" for t in model.lora_targets)]
        if not chosen:
            raise DiffattrError("--params lora: this UNet has no attention projections (to_q/to_k/to_v) to adapt")
        return chosen
    pattern = re.compile(model.parameter_groups.get(which, which))
    chosen = [(name, p) for name, p in named if pattern.search(name)]
    if not chosen:
        hint = " (text-to-image UNets have cross-attention; this one has none)" if which in _KNOWN_SETS else ""
        raise DiffattrError(f"--params {which!r} matches no parameter of this UNet{hint}")
    return chosen


def _add_lora(model: Denoiser, network: torch.nn.Module, rank: int) -> list[torch.nn.Parameter]:
    """Wraps the attention projections with a fresh LoRA adapter (B = 0: the copy starts equal to
    the model) and returns the adapter's parameters, the only ones that move."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(model.lora_targets), init_lora_weights=True)
    inject_adapter_in_model(config, network, adapter_name=_LORA_ADAPTER)
    return [p for name, p in network.named_parameters() if "lora_" in name]


def query_loss(
    model: Denoiser,
    network: torch.nn.Module,
    query: torch.Tensor,
    condition: torch.Tensor | None,
    *,
    draws: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Mean denoising loss of one query over ``draws`` random (timestep, noise) pairs.

    Args:
        query: ``(C, H, W)`` encoding of the query.
        condition: the query's condition with a leading batch dimension of 1, or ``None``.
    """
    device = model.device
    t = torch.randint(0, model.num_train_timesteps, (draws,), generator=generator).to(device)
    noise = torch.randn((draws, *query.shape), generator=generator).to(device)
    clean = query.to(device).expand(draws, *query.shape)
    conditions = None if condition is None else condition.to(device).expand(draws, *condition.shape[1:])
    return denoising_loss(model, clean, noise, t, conditions, network=network).loss.mean()


def perturbed_copy(
    model: Denoiser,
    query: torch.Tensor,
    condition: torch.Tensor | None,
    config: AttributionConfig,
    *,
    seed: int,
    progress: bool = False,
) -> tuple[torch.nn.Module, list[float]]:
    """A copy of the model's network after ``config.steps`` optimizer steps on the query.

    Args:
        model: the model; its network is copied, never modified.
        query: ``(C, H, W)`` encoding of the query.
        condition: ``(1, ...)`` condition of the query, or ``None``.
        config: direction, steps, learning rate, optimizer, parameters that move, draws per step.
        seed: seeds the (timestep, noise) draws, so the same query gives the same copy.
        progress: show a progress bar.

    Returns:
        The perturbed network (eval mode, no gradients) and the query loss before each step.
    """
    network = copy.deepcopy(model.network)
    if config.params == "lora":
        moving = _add_lora(model, network, config.lora_rank)
    else:
        moving = [p for _, p in select_parameters(model, config.params, network)]
    for parameter in moving:
        parameter.requires_grad_(True)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(moving, lr=config.learning_rate)
    else:
        optimizer = torch.optim.SGD(moving, lr=config.learning_rate)
    sign = 1.0 if config.direction == "descent" else -1.0
    generator = torch.Generator().manual_seed(seed)
    history = []
    # Eval mode keeps dropout off: the copy differs from the model only by the steps taken.
    network.eval()
    with torch.inference_mode(False), torch.enable_grad():  # works inside a caller's no_grad block too
        for _ in tqdm(range(config.steps), disable=not progress, desc=f"perturbing ({config.direction})"):
            loss = query_loss(model, network, query, condition, draws=config.draws_per_step, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            (sign * loss).backward()
            optimizer.step()
            history.append(loss.item())
    return network.requires_grad_(False), history
