"""The only gradients Forward-INF takes: a few bounded optimizer steps of a copy on the query.

Descent trains the copy on the query (the mirrored direction: training images that helped make
the query get easier too); ascent unlearns it. The caller's UNet is never touched.

How far the copy moves is set either by the step size (``--steps`` steps of ``--lr``) or by its
effect (``--target-change``): steps until the query's own loss, on one fixed bank of draws, has
risen (ascent) or fallen (descent) by that fraction. A fraction of the query's loss means the same
on a 0.7M-parameter UNet and on a 900M one; a learning rate does not.

MUCS (Sony, 2026) is the same loop with three switches: a retain batch of training images that the
copy keeps descending on, a weight λ on the query's term, and its stop (the query's loss clamped
at, and stopping near, an untrained model's loss L_null). AbU (Wang et al., NeurIPS 2024) is the
loop with an EWC penalty from the training loss's diagonal Fisher (``fisher.py``).
"""

from __future__ import annotations

import copy
import math
import re
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .config import OPTIMIZERS, AttributionConfig
from .denoisers import DENOISERS, Denoiser
from .errors import DiffattrError
from .fisher import ewc_penalty
from .losses import denoising_loss

_LORA_ADAPTER = "diffattr_query"
# Every family's named sets, for the hint when a name is known but this model lacks it.
_KNOWN_SETS = {name for family in DENOISERS.values() for name in family.parameter_groups}


def select_parameters(
    model: Denoiser, which: str, network: torch.nn.Module | None = None, *, flag: str = "--params"
) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters of ``network`` (default: the model's) that move: ``all``, one of the
    family's named sets (``attention``, ``mucs``, ``cross-attention-kv``), ``lora`` (the projections a fresh
    adapter wraps), or those whose name matches a regular expression."""
    named = list((model.network if network is None else network).named_parameters())
    if which == "all":
        return named
    if which == "lora":
        chosen = [(n, p) for n, p in named if any(f".{t}.weight" in f".{n}" for t in model.lora_targets)]
        if not chosen:
            raise DiffattrError(f"{flag} lora: this network has no attention projections (to_q/to_k/to_v) to adapt")
        return chosen
    pattern = re.compile(model.parameter_groups.get(which, which))
    chosen = [(name, p) for name, p in named if pattern.search(name)]
    if not chosen:
        hint = " (text-to-image UNets have cross-attention; this one has none)" if which in _KNOWN_SETS else ""
        raise DiffattrError(f"{flag} {which!r} matches no parameter of this network{hint}")
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
    return loss_on_draws(model, network, query, condition, query_draws(model, query, draws, generator))


def loss_on_draws(
    model: Denoiser,
    network: torch.nn.Module,
    query: torch.Tensor,
    condition: torch.Tensor | None,
    draws: tuple[torch.Tensor, torch.Tensor],
    *,
    reduce: bool = True,
) -> torch.Tensor:
    """Mean denoising loss of one query over given ``(timesteps, noise)`` draws (each draw's, with
    ``reduce=False``)."""
    device = model.device
    t, noise = (tensor.to(device) for tensor in draws)
    clean = query.to(device).expand(len(t), *query.shape)
    conditions = None if condition is None else condition.to(device).expand(len(t), *condition.shape[1:])
    losses = denoising_loss(model, clean, noise, t, conditions, network=network).loss
    return losses.mean() if reduce else losses


def query_draws(
    model: Denoiser, query: torch.Tensor, draws: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` random (timestep, noise) pairs for one query."""
    t = torch.randint(0, model.num_train_timesteps, (draws,), generator=generator)
    return t, torch.randn((draws, *query.shape), generator=generator)


class PerturbedCopy(NamedTuple):
    """The perturbed network and what the perturbation did.

    Attributes:
        network: the copy (eval mode, no gradients).
        query_losses: the query's loss before each optimizer step; with a stopping rule (target
            change, null stop), also the loss after the last step: the effect reached.
        steps: optimizer steps taken.
    """

    network: torch.nn.Module
    query_losses: list[float]
    steps: int


def target_reached(config: AttributionConfig, start: float, now: float) -> bool:
    """Whether the query's loss has moved from ``start`` to ``now`` by the config's target change."""
    if config.direction == "ascent":
        return now >= (1.0 + config.target_change) * start
    return now <= (1.0 - config.target_change) * start


def perturbed_copy(
    model: Denoiser,
    query: torch.Tensor,
    condition: torch.Tensor | None,
    config: AttributionConfig,
    *,
    seed: int,
    progress: bool = False,
    retain: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    null_loss: float | None = None,
    fisher: dict[str, torch.Tensor] | None = None,
) -> PerturbedCopy:
    """A copy of the model's network after ``config.steps`` optimizer steps on the query (at most
    that many with a stopping rule).

    Args:
        model: the model; its network is copied, never modified.
        query: ``(C, H, W)`` encoding of the query.
        condition: ``(1, ...)`` condition of the query, or ``None``.
        config: direction, steps, learning rate, optimizer, parameters that move, draws per step,
            and the optional stopping rules and retain term.
        seed: seeds the (timestep, noise) draws, so the same query gives the same copy.
        progress: show a progress bar.
        retain: ``(encodings, conditions)`` of the training set, for ``config.retain_batch``.
        null_loss: an untrained network's mean loss, for ``config.null_stop``.
        fisher: ``{parameter name: F}`` (``fisher.diagonal_fisher``), for ``config.ewc_weight``.

    Returns:
        The copy and its query losses and step count (:class:`PerturbedCopy`). With
        ``config.target_change`` the draws are one fixed bank, so the loss is a function of the
        weights alone, and the steps stop once the change is reached (``config.steps`` bounds them).
        With ``config.null_stop`` (MUCS) each draw's loss is clamped at ``null_loss`` and the steps
        stop once their mean reaches that fraction of it. With ``config.retain_batch`` every step
        also descends on that many random training images (MUCS's retain term), and the query's
        term is weighted by ``config.query_weight``. With ``config.ewc_weight`` (AbU) every step
        also pays ``ewc_weight · ½ Σ F (θ − θ*)²`` for leaving the model's weights θ*.
    """
    if config.retain_batch and retain is None:
        raise ValueError("config.retain_batch needs the training set (retain=)")
    if config.null_stop is not None and null_loss is None:
        raise ValueError("config.null_stop needs the untrained model's loss (null_loss=)")
    if config.ewc_weight and fisher is None:
        raise ValueError("config.ewc_weight needs the Fisher (fisher=)")
    network = copy.deepcopy(model.network)
    if config.params == "lora":
        moving = _add_lora(model, network, config.lora_rank)
        named = []
    else:
        named = select_parameters(model, config.params, network)
        moving = [p for _, p in named]
    if config.ewc_weight:  # θ* and F where the steps run, once rather than on every step
        anchor = {name: p.detach().clone() for name, p in named}
        fisher = {name: fisher[name].to(p.device, p.dtype) for name, p in named}
    for parameter in moving:
        parameter.requires_grad_(True)
    optimizer = getattr(torch.optim, OPTIMIZERS[config.optimizer])(moving, lr=config.learning_rate)
    sign = 1.0 if config.direction == "descent" else -1.0
    generator = torch.Generator().manual_seed(seed)
    targeted = config.target_change is not None
    bank = query_draws(model, query, config.draws_per_step, generator) if targeted else None

    def query_term() -> torch.Tensor:
        draws = bank if bank is not None else query_draws(model, query, config.draws_per_step, generator)
        losses = loss_on_draws(model, network, query, condition, draws, reduce=False)
        return losses.clamp(max=null_loss).mean() if config.null_stop is not None else losses.mean()

    def done(history: list[float]) -> bool:
        if targeted and target_reached(config, history[0], history[-1]):
            return True
        return config.null_stop is not None and history[-1] >= config.null_stop * null_loss

    history, steps = [], 0
    # Eval mode keeps dropout off: the copy differs from the model only by the steps taken.
    network.eval()
    with torch.inference_mode(False), torch.enable_grad():  # works inside a caller's no_grad block too
        bar = tqdm(total=config.steps, disable=not progress, desc=f"perturbing ({config.direction})")
        while True:
            at_bound = steps == config.steps
            if at_bound and not config.stops_early:
                break
            loss = query_term()
            history.append(loss.item())
            _refuse_divergence(history[-1], steps, config)
            if at_bound or (config.stops_early and done(history)):
                break
            objective = sign * config.query_weight * loss
            if config.retain_batch:
                objective = objective + _retain_loss(model, network, retain, config.retain_batch, generator)
            if config.ewc_weight:
                objective = objective + config.ewc_weight * ewc_penalty(named, anchor, fisher)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            steps += 1
            bar.update()
        bar.close()
    if not all(torch.isfinite(parameter).all() for parameter in moving):  # the last step's effect, unseen above
        _refuse_divergence(float("nan"), steps, config)
    for parameter in network.parameters():  # a kept copy (shared passes) holds no gradients
        parameter.grad = None
    return PerturbedCopy(network.requires_grad_(False), history, steps)


def _refuse_divergence(loss: float, steps: int, config: AttributionConfig) -> None:
    """A perturbation that diverged would score every training image NaN: refused, naming the flags."""
    if not math.isfinite(loss):
        raise DiffattrError(
            f"the perturbation diverged: the query's loss is {loss} after {steps} of --steps {config.steps} "
            f"(--lr {config.learning_rate:g}, --direction {config.direction}); lower --lr or --steps"
        )


def _retain_loss(model, network, retain, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Mean denoising loss of ``batch_size`` random training images (fresh timesteps and noise)."""
    encodings, conditions = retain
    rows = torch.randint(len(encodings), (batch_size,), generator=generator).sort().values
    clean = encodings[rows].to(model.device)
    t = torch.randint(0, model.num_train_timesteps, (batch_size,), generator=generator)
    noise = torch.randn(clean.shape, generator=generator)
    labels = None if conditions is None else conditions[rows].to(model.device)
    return denoising_loss(model, clean, noise.to(model.device), t.to(model.device), labels, network=network).loss.mean()
