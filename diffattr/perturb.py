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
from .errors import DiffattrError
from .losses import add_noise, denoising_target, per_sample_mse
from .models import DiffusionModel

_NAMED_SETS = {
    "attention": re.compile(r"attn|attention"),
    # Key and value projections of cross-attention (``attn2`` in diffusers' transformer blocks):
    # the text-to-image "custom diffusion" choice of Wang et al. 2024.
    "cross-attention-kv": re.compile(r"attn2\.to_[kv]\."),
}
# Linear layers a fresh LoRA adapter wraps: the attention projections of every diffusers UNet.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
_LORA_ADAPTER = "diffattr_query"


def select_parameters(unet: torch.nn.Module, which: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters that move: ``all``, a named set (``attention``, ``cross-attention-kv``),
    ``lora`` (the attention projections a fresh adapter wraps), or those whose name matches a regex."""
    named = list(unet.named_parameters())
    if which == "all":
        return named
    if which == "lora":
        chosen = [(n, p) for n, p in named if any(f".{t}.weight" in f".{n}" for t in LORA_TARGETS)]
        if not chosen:
            raise DiffattrError("--params lora: this UNet has no attention projections (to_q/to_k/to_v) to adapt")
        return chosen
    pattern = _NAMED_SETS.get(which) or re.compile(which)
    chosen = [(name, p) for name, p in named if pattern.search(name)]
    if not chosen:
        hint = " (text-to-image UNets have cross-attention; this one has none)" if which in _NAMED_SETS else ""
        raise DiffattrError(f"--params {which!r} matches no parameter of this UNet{hint}")
    return chosen


def _add_lora(unet: torch.nn.Module, rank: int) -> list[torch.nn.Parameter]:
    """Wraps the attention projections with a fresh LoRA adapter (B = 0: the copy starts equal to
    the model) and returns the adapter's parameters, the only ones that move."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True)
    inject_adapter_in_model(config, unet, adapter_name=_LORA_ADAPTER)
    return [p for name, p in unet.named_parameters() if "lora_" in name]


def query_loss(
    model: DiffusionModel,
    unet: torch.nn.Module,
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
    alpha_bar = model.alphas_cumprod.to(device)[t]
    conditions = None if condition is None else condition.to(device).expand(draws, *condition.shape[1:])
    prediction = model.predict(add_noise(clean, noise, alpha_bar), t, conditions, unet=unet)
    return per_sample_mse(prediction, denoising_target(clean, noise, alpha_bar, model.prediction_type)).mean()


def perturbed_copy(
    model: DiffusionModel,
    query: torch.Tensor,
    condition: torch.Tensor | None,
    config: AttributionConfig,
    *,
    seed: int,
    progress: bool = False,
) -> tuple[torch.nn.Module, list[float]]:
    """A copy of the model's UNet after ``config.steps`` optimizer steps on the query.

    Args:
        model: the model; its UNet is copied, never modified.
        query: ``(C, H, W)`` encoding of the query.
        condition: ``(1, ...)`` condition of the query, or ``None``.
        config: direction, steps, learning rate, optimizer, parameters that move, draws per step.
        seed: seeds the (timestep, noise) draws, so the same query gives the same copy.
        progress: show a progress bar.

    Returns:
        The perturbed UNet (eval mode, no gradients) and the query loss before each step.
    """
    unet = copy.deepcopy(model.unet)
    if config.params == "lora":
        moving = _add_lora(unet, config.lora_rank)
    else:
        moving = [p for _, p in select_parameters(unet, config.params)]
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
    unet.eval()
    with torch.inference_mode(False), torch.enable_grad():  # works inside a caller's no_grad block too
        for _ in tqdm(range(config.steps), disable=not progress, desc=f"perturbing ({config.direction})"):
            loss = query_loss(model, unet, query, condition, draws=config.draws_per_step, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            (sign * loss).backward()
            optimizer.step()
            history.append(loss.item())
    return unet.requires_grad_(False), history
