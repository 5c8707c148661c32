"""The Lightning stage that reconstructs one unit, and the same step in a plain torch loop.

`ReconstructionStage` optimises whatever the caller made learnable inside the unit: the `alpha` of
every `AdaRoundQuantizer` (Adam, lr 1e-3, constant) and every quantizer `scale` that is an
`nn.Parameter` (LSQ, `make_scale_learnable`; Adam, lr 4e-5, cosine decay to 0). Which layers get
AdaRound, which scales are learned and the QDrop probability are the method's business, set before the
stage runs. The two Adams are one `torch.optim.Adam` with two parameter groups (Adam's state is per
parameter, so this is the same update) and one `LambdaLR` with a factor per group.

One step = one captured sample (one image with all its boxes): loss = sum over output streams of
w_s * Lp(unit(inputs), FP targets) + weight(step) * rounding regulariser(beta(step)). The Lp error's
default reduction is QDrop's (`reduction="qdrop"`: summed over dim 1, averaged over the rest), the scale
the regulariser weight 0.01 was tuned against; `reduction="mean"` is the plain per-stream MSE.
`reconstruct_unit` drives it with a lean `lightning.Trainer`; `reconstruct_unit_plain` runs the very
same `optimization_step` in a for loop (the overhead reference). Both draw samples in the same seeded
order and seed QDrop's draws inside a forked RNG, so they give the same loss curve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from carsam.quant.adaround import AdaRoundQuantizer
from carsam.quant.quantizers import UniformQuantizer
from carsam.recon.block_io import BlockIO, UnitSample
from carsam.recon.losses import rounding_regularizer, stream_losses, weighted_sum
from carsam.recon.schedules import RoundingSchedule, cosine_factor
from carsam.recon.units import ReconUnit

if TYPE_CHECKING:
    from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
    from torch.optim.lr_scheduler import LRScheduler

    from carsam.config import ReconConfig

logger = logging.getLogger(__name__)

ROUND_KEY, TOTAL_KEY = "round", "total"


@dataclasses.dataclass(frozen=True)
class ReconSettings:
    """Hyper-parameters of one unit's reconstruction.

    The fields shared with the config's `recon` section (iters, alpha_lr, scale_lr, round_weight, warmup,
    seed) have no defaults here: their one home is `carsam.config.ReconConfig`, and `from_config` builds the
    settings from it. The stage-only fields (the beta schedule, the Lp norm, the reduction, JCAR's stream
    weights) default to QDrop's.
    """

    iters: int
    alpha_lr: float
    scale_lr: float
    round_weight: float
    warmup: float
    seed: int
    beta_start: float = 20.0
    beta_end: float = 2.0
    p: float = 2.0
    reduction: str = "qdrop"
    stream_weights: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_config(cls, recon: ReconConfig, **stage: Any) -> ReconSettings:
        """The settings of `recon` (a `ReconConfig`), with stage-only fields from `stage`."""
        return cls(iters=recon.iters, alpha_lr=recon.alpha_lr, scale_lr=recon.scale_lr,
                   round_weight=recon.round_weight, warmup=recon.warmup, seed=recon.seed, **stage)

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")

    def rounding_schedule(self) -> RoundingSchedule:
        return RoundingSchedule(self.iters, self.round_weight, self.warmup, self.beta_start, self.beta_end)


@dataclasses.dataclass
class ReconResult:
    """Per-step losses of one unit (`curve[stream]`, plus `round` and `total`) and the loop's timing."""

    unit: str
    curve: dict[str, list[float]]
    steps: int
    seconds: float

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, self.steps)


def adaround_quantizers(module: nn.Module) -> list[AdaRoundQuantizer]:
    """The `AdaRoundQuantizer`s inside `module` (their `alpha`s are optimised)."""
    return [m for m in module.modules() if isinstance(m, AdaRoundQuantizer)]


def learnable_scales(module: nn.Module) -> list[nn.Parameter]:
    """The quantizer scales inside `module` that were made learnable (`make_scale_learnable`)."""
    return [m.scale for m in module.modules() if isinstance(m, UniformQuantizer) and isinstance(m.scale, nn.Parameter)]


@contextlib.contextmanager
def only_trainable(module: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Inside the block, `requires_grad` is True on `params` and False on every other parameter of `module`."""
    keep = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class ReconstructionStage(LightningModule):
    """Reconstruct one unit on its block I/O (manual optimisation: one Adam, one LambdaLR, stepped per sample).

    Args:
        module: the unit's root module (`unit.module(sam)`); its parameters are shared with the SAM.
        unit: what the module is (streams, how to call it).
        block_io: the unit's captured inputs and FP targets.
        settings: the hyper-parameters.
        on_step: called after every optimisation step (a progress bar's update), or None.
    """

    def __init__(self, module: nn.Module, unit: ReconUnit, block_io: BlockIO, settings: ReconSettings,
                 on_step: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.unit_module = module
        self.unit, self.block_io, self.settings = unit, block_io, settings
        self.schedule = settings.rounding_schedule()
        self.adarounds = adaround_quantizers(module)
        self.scales = learnable_scales(module)
        self.stream_weights = dict(settings.stream_weights)
        self.step_index = 0
        self.on_step = on_step
        self._history: list[Tensor] = []
        if not self.adarounds and not self.scales:
            raise ValueError(f"unit '{unit.name}' has nothing to optimise (no AdaRound layer, no learnable scale)")

    @property
    def curve_keys(self) -> tuple[str, ...]:
        return (*self.unit.streams, ROUND_KEY, TOTAL_KEY)

    def trainable(self) -> list[nn.Parameter]:
        return [q.alpha for q in self.adarounds] + self.scales

    def compute_losses(self, sample: UnitSample, step: int) -> dict[str, Tensor]:
        """Per-stream reconstruction losses, the weighted regulariser and their total (scalars)."""
        preds = self.unit.run(self.unit_module, sample.args, sample.kwargs)
        losses = stream_losses(preds, sample.targets, self.unit.streams, self.settings.p, self.settings.reduction)
        recon = weighted_sum(losses, self.stream_weights)
        weight = self.schedule.weight_at(step)
        if weight > 0 and self.adarounds:
            round_loss = weight * rounding_regularizer(self.adarounds, self.schedule.beta(step)).to(recon.device)
        else:
            round_loss = recon.new_zeros(())
        return {**losses, ROUND_KEY: round_loss, TOTAL_KEY: recon + round_loss}

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        groups, factors = [], []
        alphas = [q.alpha for q in self.adarounds]
        if alphas:
            groups.append({"params": alphas, "lr": self.settings.alpha_lr})
            factors.append(lambda step: 1.0)
        if self.scales:
            groups.append({"params": self.scales, "lr": self.settings.scale_lr})
            factors.append(lambda step: cosine_factor(step, self.settings.iters))
        optimizer = torch.optim.Adam(groups)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factors)}

    def optimization_step(self, sample: UnitSample, optimizer: torch.optim.Optimizer,
                          scheduler: torch.optim.lr_scheduler.LRScheduler) -> Tensor:
        """One step on one sample, shared by both drivers; records the losses without a device sync."""
        losses = self.compute_losses(sample, self.step_index)
        optimizer.zero_grad(set_to_none=True)
        if self._trainer is not None:
            self.manual_backward(losses[TOTAL_KEY])
        else:
            losses[TOTAL_KEY].backward()
        optimizer.step()
        scheduler.step()
        self._history.append(torch.stack([losses[k].detach() for k in self.curve_keys]))
        self.step_index += 1
        if self.on_step is not None:
            self.on_step()
        return losses[TOTAL_KEY]

    def training_step(self, batch: UnitSample, batch_idx: int) -> Tensor:
        optimizer = self.optimizers(use_pl_optimizer=False)
        return self.optimization_step(batch, optimizer, self.lr_schedulers())  # type: ignore[arg-type]

    def transfer_batch_to_device(self, batch: UnitSample, device: torch.device, dataloader_idx: int) -> UnitSample:
        return batch.to(device, non_blocking=device.type == "cuda")

    def curve(self) -> dict[str, list[float]]:
        """The recorded per-step losses by key (one device sync for the whole run)."""
        if not self._history:
            return {k: [] for k in self.curve_keys}
        table = torch.stack(self._history).cpu().tolist()
        return {k: [row[i] for row in table] for i, k in enumerate(self.curve_keys)}


class _Samples:
    """A sized iterable of captured samples (CPU) in a fixed order: the stage's 'dataloader'."""

    def __init__(self, block_io: BlockIO, order: list[int]) -> None:
        self.block_io, self.order = block_io, order

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[UnitSample]:
        return self.block_io.stream(self.order)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


@contextlib.contextmanager
def _training(module: nn.Module, device: torch.device, params: list[nn.Parameter], seed: int) -> Iterator[None]:
    """Train mode, trainable `params` only and a forked RNG seeded with `seed`; all restored on exit."""
    was_training = module.training
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), only_trainable(module, params):
            torch.manual_seed(seed)
            module.train()
            yield
    finally:
        module.train(was_training)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit banners and data-loader hints (restored afterwards)."""
    names = ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    try:
        for lg, _ in saved:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LeafSpec).*")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _result(stage: ReconstructionStage, seconds: float) -> ReconResult:
    curve = stage.curve()
    recon = [total - rounding for total, rounding in zip(curve[TOTAL_KEY], curve[ROUND_KEY])]
    # the two apart: the regulariser counts only after the warm-up (and grows as beta falls), so their sum grows
    # and reads as divergence while the reconstruction error falls
    logger.info("recon %s: %d steps in %.2fs, reconstruction loss %.4g -> %.4g, rounding regulariser (weighted) "
                "%.4g -> %.4g", stage.unit.name, stage.step_index, seconds, recon[0], recon[-1],
                curve[ROUND_KEY][0], curve[ROUND_KEY][-1])
    return ReconResult(stage.unit.name, curve, stage.step_index, seconds)


def _lean_trainer(device: torch.device, iters: int) -> Trainer:
    """A Trainer with nothing but the loop: no checkpointing, logger, progress bar, summary or validation."""
    cuda = device.type == "cuda"
    return Trainer(accelerator="gpu" if cuda else "cpu", devices=[device.index or 0] if cuda else 1,
                   max_steps=iters, max_epochs=1, barebones=True, enable_checkpointing=False,
                   enable_model_summary=False, enable_progress_bar=False, logger=False,
                   num_sanity_val_steps=0, limit_val_batches=0)


def reconstruct_unit(sam: nn.Module, unit: ReconUnit, block_io: BlockIO, settings: ReconSettings,
                     on_step: Callable[[], None] | None = None) -> ReconResult:
    """Reconstruct `unit` of `sam` in place with a lean Lightning Trainer, on the device the unit is on.

    No checkpointing, logger, progress bar, model summary or validation; `max_steps = settings.iters`.
    `on_step` is called after every step (carsam's own progress bar, `carsam.recon.progress`).
    The unit is put back on its device and in its train/eval mode afterwards.
    """
    module = unit.module(sam)
    device = _device_of(module)
    stage = ReconstructionStage(module, unit, block_io, settings, on_step)
    loader = _Samples(block_io, block_io.order(settings.iters, settings.seed))
    with _quiet_lightning(), _training(module, device, stage.trainable(), settings.seed):
        start = time.perf_counter()
        trainer = _lean_trainer(device, settings.iters)
        trainer.fit(stage, train_dataloaders=loader)
        seconds = time.perf_counter() - start
    module.to(device)
    return _result(stage, seconds)


def reconstruct_unit_plain(sam: nn.Module, unit: ReconUnit, block_io: BlockIO, settings: ReconSettings,
                           on_step: Callable[[], None] | None = None) -> ReconResult:
    """The same reconstruction as `reconstruct_unit`, driven by a plain torch loop (the overhead reference)."""
    module = unit.module(sam)
    device = _device_of(module)
    stage = ReconstructionStage(module, unit, block_io, settings, on_step)
    config = stage.configure_optimizers()
    order = block_io.order(settings.iters, settings.seed)
    with _training(module, device, stage.trainable(), settings.seed):
        start = time.perf_counter()
        for sample in block_io.stream(order, device):
            # configure_optimizers puts a LambdaLR there, never a scheduler config or ReduceLROnPlateau
            stage.optimization_step(sample, config["optimizer"], cast("LRScheduler", config["lr_scheduler"]))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return _result(stage, seconds)


__all__ = ["ReconResult", "ReconSettings", "ReconstructionStage", "adaround_quantizers", "learnable_scales",
           "only_trainable", "reconstruct_unit", "reconstruct_unit_plain"]
