"""The one training loop every deep detector uses.

The engine runs on the CPU, one GPU (with automatic mixed precision) or several GPUs and
nodes through Lightning Fabric (``devices``/``num_nodes``; under ``torchrun`` Fabric picks the
environment up). It keeps a per-epoch history, writes an atomic checkpoint every epoch, stops
early on the normal validation loss and resumes an interrupted run bit-for-bit: each epoch's
shuffling and dropout draw from a generator seeded by ``(seed, epoch)``, not from state that a
crash would lose.

Datasets whose cases keep their own shapes (a streamed set scored by a sliding-window or
fully convolutional model) are batched by :class:`ShapeBatchSampler`: every batch holds cases
of one shape.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_fabric import Fabric
from lightning_fabric.strategies import DDPStrategy
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    default_collate,
)
from tqdm.auto import tqdm

from medanomaly.errors import ConfigError, did_you_mean
from medanomaly.io.atomic import atomic_write_text
from medanomaly.io.safe_files import load_state, save_state
from medanomaly.training.compiled import compile_network, dynamic_batch
from medanomaly.training.layout import (
    MEASURE_IMAGES,
    canonical_memory_format,
    choose_layout,
    is_measuring,
    set_network_layout,
    to_layout,
    untouched,
)
from medanomaly.training.precision import (
    AutocastForward,
    autocast_dtype,
    canonical_precision,
    choose_precision,
    float32_small_convolutions,
)

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
HISTORY_NAME = "history.csv"
VAL_MIN = 20
"""Default of ``engine.val_min``: held-out normals a default threshold should rest on."""
MONITORS = ("val_loss", "val_auroc")


@dataclass(frozen=True)
class EngineConfig:
    """Training settings shared by every deep detector (the ``engine:`` block of a config).

    Attributes:
        epochs: Maximum number of passes over the training data.
        batch_size: Images per optimisation step (per device).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        seed: Seeds weight initialisation, shuffling, dropout and the validation split.
        patience: Stop after this many epochs without a better monitored value; ``None``
            never stops early.
        monitor: What ranks the epochs for early stopping and for the weights kept at the
            end: ``val_loss`` (loss on the normal validation images, lower is better) or
            ``val_auroc`` (image AUROC of the scores on a labelled validation set, higher is
            better, ties broken by the lower validation loss; the UAD slide deck's model selection).
            With fewer than :data:`MIN_AUROC_MONITOR_ABNORMAL` abnormal validation images
            ``val_auroc`` falls back to ``val_loss`` (one warning; the run's ``config.yaml``
            says which ranked the epochs, under ``resolved: epoch_monitor``).
        val_fraction: Share of the normal training images held out for validation when no
            validation set is given.
        val_min: Hold out at least this many normal images when the set holds three times as
            many, so that the default threshold does not rest on a handful of scores: 70
            training normals with ``val_fraction: 0.1`` hold out 20, not 7 (smaller sets keep
            ``val_fraction``, and ``fit`` warns).
        accelerator: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"gpu"``.
        devices: Devices per node (``N`` runs data-parallel over ``N`` GPUs).
        num_nodes: Number of machines (launch with ``torchrun`` or a cluster launcher).
        precision: ``"auto"``: bf16 mixed precision on CPUs and GPUs that compute bf16
            natively (AVX512-BF16 or AMX; :func:`~medanomaly.training.precision.supports_bf16`),
            16-bit mixed on other GPUs, 32-bit elsewhere; or a Fabric precision
            (``32-true``, ``bf16-mixed``, ...) that overrides the choice. Weights, losses and
            scores stay float32.
        memory_format: Layout of the network's weights and inputs, per phase: ``auto``
            times a few passes of the phase's work (training: the loss's forward and
            backward pass; scoring: ``evaluate``) on a tiny batch of the real input shape
            in each layout, once per process, network class, phase, device, precision and
            input shape, and keeps the faster (:mod:`medanomaly.training.layout`);
            ``channels_last`` or ``contiguous`` force one. The run's ``config.yaml`` records
            the choice under ``resolved: memory_format``.
        compile: Run the network through ``torch.compile`` for training and scoring; where
            compilation fails the network runs uncompiled with one warning (``fit --strict``:
            an error).
        num_workers: DataLoader worker processes.
        progress: Show a progress bar with the running loss.
    """

    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    patience: int | None = 10
    monitor: str = "val_loss"
    val_fraction: float = 0.1
    val_min: int = VAL_MIN
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    precision: str = "auto"
    memory_format: str = "auto"
    compile: bool = False
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("engine: epochs and batch_size must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"engine: val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_min < 0:
            raise ConfigError(f"engine: val_min must be >= 0, got {self.val_min}")
        canonical_precision(self.precision)
        canonical_memory_format(self.memory_format)
        if not isinstance(self.compile, bool):
            raise ConfigError(f"engine: compile must be true or false, got {self.compile!r}")
        if self.monitor not in MONITORS:
            raise ConfigError(
                f"engine: monitor must be one of {MONITORS}, got {self.monitor!r}."
                + did_you_mean(self.monitor, MONITORS)
            )

    @classmethod
    def from_any(cls, value: EngineConfig | dict[str, Any] | None) -> EngineConfig:
        """Build from an ``EngineConfig``, a plain dict (YAML) or ``None`` (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"engine: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, as written in configs and checkpoints."""
        return asdict(self)


Optimizers = dict[str, torch.optim.Optimizer]
Backward = Callable[[torch.Tensor], None]
TrainingStep = Callable[[nn.Module, torch.Tensor, Optimizers, Backward, int], torch.Tensor]


@dataclass
class TrainingTask:
    """What the engine needs from a detector: a network and how to compute its losses.

    Most models only give ``loss``: the engine then runs one Adam optimiser over the trainable
    parameters. Models with several players (GANs) also give ``optimizers`` and ``step``.

    Attributes:
        network: The module to optimise (frozen parts: ``requires_grad=False``).
        loss: ``loss(network, batch) -> scalar tensor`` used for training and validation.
        score: ``score(network, batch) -> (B,) tensor`` of anomaly scores, for the history
            of labelled validation data (Chung & Choi 2023, Fig. 2).
        optimizers: ``optimizers(network) -> {name: optimizer}``; default one Adam with the
            engine's ``lr`` and ``weight_decay``.
        step: ``step(network, batch, optimizers, backward, index) -> loss`` runs one training
            step itself (zero_grad, ``backward(loss)``, ``optimizer.step()``) and returns the
            loss to log; ``index`` counts batches within the epoch. Default: minimise ``loss``.
        keep_best: Load the weights of the epoch with the lowest validation loss at the end
            (``False`` keeps the last epoch, e.g. for a GAN whose loss does not rank epochs).
        supervised: Batches are ``(images, labels)`` and the validation loss is the mean
            over normal *and* abnormal validation images (a classifier's loss needs both).
        before_validation: ``before_validation(network)`` runs (in eval mode, without
            gradients) before each validation pass, e.g. to refresh statistics ``score``
            needs.
        epoch_start: ``epoch_start(epoch, optimizers)`` runs before each epoch (0-based),
            e.g. to set the learning rate of a schedule; a function of the epoch alone, so
            that a resumed run continues the schedule.
        collate: Joins training cases of different shapes into one batch (e.g. a random
            patch of each); ``None``: such cases are batched by shape
            (:class:`ShapeBatchSampler`). Unused when every case has one shape.
    """

    network: nn.Module
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    score: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    optimizers: Callable[[nn.Module], Optimizers] | None = None
    step: TrainingStep | None = None
    keep_best: bool = True
    supervised: bool = False
    epoch_start: Callable[[int, Optimizers], None] | None = None
    before_validation: Callable[[nn.Module], None] | None = None
    collate: Callable[[list[Any]], Any] | None = None


@dataclass
class TrainingData:
    """Datasets of the run.

    Each item is a tensor ``(C, *spatial)`` or, for a supervised task, ``(image, label)``.
    """

    train: Dataset
    val_normal: Dataset | None = None
    val_abnormal: Dataset | None = None


class ShapeBatchSampler(Sampler[list[int]]):
    """Batches of cases of one shape, for datasets whose cases differ in shape.

    With ``shuffle`` each epoch permutes the cases (seeded by ``(seed, epoch)``, see
    :meth:`set_epoch`), cuts each shape's cases into batches and permutes the batches.
    Under data parallelism every rank computes the same batches and takes every
    ``num_replicas``-th, and all ranks take equally many (the few left over are dropped
    for the epoch), so that no rank waits for a gradient the others never send.

    Args:
        shapes: Shape of each case.
        batch_size: Cases per batch (a shape's last batch may be smaller).
        shuffle: Draw a new order every epoch; otherwise the input order, grouped by shape.
        seed: Seeds the order.
        num_replicas: Processes sharing the batches.
        rank: This process.
    """

    def __init__(
        self,
        shapes: list[tuple[int, ...]],
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.shapes = [tuple(s) for s in shapes]
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (a resumed run draws exactly the batches it missed)."""
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        rng = np.random.default_rng(epoch_seed(self.seed, self.epoch))
        order = rng.permutation(len(self.shapes)) if self.shuffle else range(len(self.shapes))
        groups: dict[tuple[int, ...], list[int]] = {}
        for index in order:
            groups.setdefault(self.shapes[index], []).append(int(index))
        batches = [
            members[start : start + self.batch_size]
            for members in groups.values()
            for start in range(0, len(members), self.batch_size)
        ]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _mine(self) -> list[list[int]]:
        batches = self._all_batches()
        if self.num_replicas == 1:
            return batches
        share = len(batches) // self.num_replicas
        return batches[self.rank :: self.num_replicas][:share]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._mine())

    def __len__(self) -> int:
        return len(self._mine())


def has_several_shapes(dataset: Dataset) -> bool:
    """True for a dataset whose cases differ in shape (it then lists them in ``shapes``)."""
    shapes = getattr(dataset, "shapes", None)
    return shapes is not None and len(set(shapes)) > 1


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's shuffling and dropout (stable across interruptions)."""
    return (seed * 1_000_003 + epoch) % (2**31)


def resolve_precision(
    config: EngineConfig, device_type: str | None = None, strict: bool = False
) -> str:
    """The Fabric precision ``config.precision`` means on this machine (``auto`` resolved).

    Args:
        config: The training settings.
        device_type: ``cpu`` or ``cuda``; ``None``: the device the engine trains on.
        strict: Raise instead of falling back from bf16 on a device without it.

    Raises:
        ConfigError: See :func:`~medanomaly.training.precision.choose_precision`.
    """
    return choose_precision(config.precision, device_type or training_device_type(config), strict)


def scoring_network(network: nn.Module, config: EngineConfig) -> nn.Module:
    """``network`` as scoring runs it on its device under ``config.precision``.

    Where the precision resolves to ``bf16-mixed``, the network's calls run under bf16
    autocast and return float32 (:class:`~medanomaly.training.precision.AutocastForward`),
    so that residuals, maps and scores stay float32; elsewhere the network as it is.
    """
    device_type = next(network.parameters()).device.type
    dtype = autocast_dtype(resolve_precision(config, device_type))
    return network if dtype is None else AutocastForward(network, dtype)


def training_device_type(config: EngineConfig) -> str:
    """``cuda`` when the engine trains on a GPU, else ``cpu``."""
    wants_gpu = config.accelerator in ("auto", "cuda", "gpu")
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block on torch's generators seeded with ``seed``, then give the caller's back.

    Dropout, weight initialisation and the models' noise draw from torch's default generators,
    which take no ``generator`` argument. Inside this block they are forked from the caller's
    and seeded, so a fit is reproducible and leaves no trace in the caller's random state
    (one test's training never changes the draws of the next).
    """
    devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


MIN_AUROC_MONITOR_ABNORMAL = 20
"""Fewest abnormal validation images for ranking epochs by their AUROC. With a handful, the
epoch is picked by a few cases' noise (and the validation figure then carries that choice's
optimism), so the normals' validation loss ranks the epochs instead."""


def epoch_monitor(asked: str, n_abnormal: int) -> tuple[str, str]:
    """What ranks the epochs, given what was asked and the abnormal validation images.

    Returns:
        ``(monitor, in words)``, e.g. ``("val_loss", "val_loss (val_auroc asked, but ...)")``.
    """
    if asked != "val_auroc":
        return asked, asked
    if n_abnormal >= MIN_AUROC_MONITOR_ABNORMAL:
        return asked, f"val_auroc on {n_abnormal} abnormal validation images"
    return "val_loss", (
        f"val_loss (val_auroc asked, but {n_abnormal} abnormal validation images are fewer "
        f"than {MIN_AUROC_MONITOR_ABNORMAL})"
    )


class Engine:
    """Owns the training loop: optimiser, epochs, early stopping, history and checkpoints.

    Args:
        config: The training settings.

    Attributes:
        monitor_used: What ranked the epochs of the last :meth:`fit`, in words.
        memory_format_used: The layout the last :meth:`fit` trained in (``channels_last``
            or ``contiguous``; see ``EngineConfig.memory_format``).
        compiled_used: The last :meth:`fit` trained a ``torch.compile``-d network.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.is_global_zero = True
        self.monitor_used = config.monitor
        self.memory_format_used = "contiguous"
        self.compiled_used = False

    def fit(
        self,
        task: TrainingTask,
        data: TrainingData,
        run_dir: str | Path | None = None,
        resume: bool = False,
        extra_state: dict[str, Any] | None = None,
        stage: str = "",
    ) -> list[dict[str, float]]:
        """Train ``task.network`` in place and leave the best weights loaded in it.

        Args:
            task: The network and its loss/score functions.
            data: Training and validation datasets.
            run_dir: Folder for ``checkpoint.safetensors`` and ``history.csv``; ``None`` keeps
                nothing.
            resume: Continue from ``run_dir/checkpoint.safetensors`` if it exists.
            extra_state: Stored in each checkpoint so that a resumed run can check it
                continues the same experiment (the resolved config).
            stage: Name of a training stage of a multi-stage model; its files are
                ``checkpoint_<stage>.safetensors`` and ``history_<stage>.csv``.

        Returns:
            The per-epoch history (one dict per epoch).
        """
        with seeded(self.config.seed):
            return self._fit(task, data, run_dir, resume, extra_state, stage)

    def _fit(
        self,
        task: TrainingTask,
        data: TrainingData,
        run_dir: str | Path | None,
        resume: bool,
        extra_state: dict[str, Any] | None,
        stage: str,
    ) -> list[dict[str, float]]:
        cfg = self.config
        precision = resolve_precision(cfg)
        fabric = self._make_fabric(precision, find_unused_parameters=task.step is not None)
        self.is_global_zero = fabric.is_global_zero
        network = task.network
        if fabric.world_size > 1 and fabric.device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(network)
        optimizers = (task.optimizers or self._default_optimizers)(network)
        n_abnormal = 0 if data.val_abnormal is None else len(data.val_abnormal)
        monitor, self.monitor_used = epoch_monitor(cfg.monitor, n_abnormal)
        if monitor != cfg.monitor and task.keep_best:
            log.warning("engine: epochs ranked by %s", self.monitor_used)
        state = _RunState(best_state=_cpu_state(network))
        checkpoint_path = Path(run_dir) / stage_file(CHECKPOINT_NAME, stage) if run_dir else None
        if resume and checkpoint_path is not None and checkpoint_path.exists():
            state = _RunState.restore(checkpoint_path, network, optimizers, extra_state)
            log.info("resuming %s at epoch %d", checkpoint_path, state.epoch)
        bf16_on_cpu = precision.startswith("bf16") and fabric.device.type == "cpu"
        module = self._prepare_network(fabric, task, data, precision, bf16_on_cpu, state)
        model, *wrapped = fabric.setup(module, *optimizers.values())
        optimizers = dict(zip(optimizers, wrapped, strict=True))
        loaders = self._loaders(fabric, data, task.collate)
        bar = tqdm(
            total=cfg.epochs,
            initial=state.epoch,
            desc=f"{stage} epochs".strip(),
            # None: tqdm shows the bar on a terminal only, keeping logs of batch jobs clean
            disable=None if cfg.progress and fabric.is_global_zero else True,
        )
        while state.epoch < cfg.epochs and not state.stopped:
            torch.manual_seed(epoch_seed(cfg.seed, state.epoch))
            _reseed(data.train, cfg.seed, state.epoch, fabric.global_rank)
            if task.epoch_start is not None:
                task.epoch_start(state.epoch, optimizers)
            with float32_small_convolutions(network, bf16_on_cpu):
                row = self._run_epoch(fabric, model, optimizers, task, loaders, state.epoch)
            state.record(row, network, cfg.patience, monitor)
            if checkpoint_path is not None and fabric.is_global_zero:
                state.save(checkpoint_path, network, optimizers, extra_state)
                _write_history(Path(run_dir) / stage_file(HISTORY_NAME, stage), state.history)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "epoch"})
        bar.close()
        if task.keep_best:
            network.load_state_dict(state.best_state)
        return state.history

    def _prepare_network(
        self,
        fabric: Fabric,
        task: TrainingTask,
        data: TrainingData,
        precision: str,
        bf16_on_cpu: bool,
        state: _RunState,
    ) -> nn.Module:
        """Put ``task.network`` in its training layout; compiled where ``compile`` asks.

        ``memory_format: auto`` times the loss's forward and backward pass on a tiny batch
        of the training data in each layout (not under data parallelism, where every rank
        must hold the same layout: there ``auto`` keeps the default one). A resumed run
        keeps the layout its checkpoint recorded: layouts round differently, and a resume
        must continue bit for bit.
        """
        cfg = self.config
        network = task.network.to(fabric.device)
        requested = cfg.memory_format
        if requested == "auto" and fabric.world_size > 1:
            requested = "contiguous"
        if requested == "auto" and state.memory_format is not None:
            requested = state.memory_format
        example = None
        if (requested == "auto" and is_measuring()) or cfg.compile:
            example = self._example_batch(fabric, task, data)

        def work(batch: Any, module: nn.Module = network) -> None:
            with float32_small_convolutions(network, bf16_on_cpu), fabric.autocast():
                loss = task.loss(module, batch)
            if loss.requires_grad:
                loss.backward()

        layout = choose_layout(requested, network, example, "training", precision, work)
        set_network_layout(network, layout)
        self.memory_format_used = state.memory_format = layout
        if not cfg.compile:
            return network
        batch = dynamic_batch(to_layout(example, layout))
        module = compile_network(network, lambda compiled: _probe(network, work, compiled, batch))
        self.compiled_used = module is not network
        return module

    def _example_batch(self, fabric: Fabric, task: TrainingTask, data: TrainingData) -> Any:
        """A batch of :data:`MEASURE_IMAGES` copies of the first training case, on the device."""
        item = data.train[0]
        several = has_several_shapes(data.train)
        collate = task.collate if several and task.collate is not None else default_collate
        return fabric.to_device(collate([item] * MEASURE_IMAGES))

    def _default_optimizers(self, network: nn.Module) -> Optimizers:
        trainable = [p for p in network.parameters() if p.requires_grad]
        cfg = self.config
        return {"adam": torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)}

    def _make_fabric(self, precision: str, find_unused_parameters: bool = False) -> Fabric:
        cfg = self.config
        return make_fabric(
            cfg.accelerator,
            cfg.devices,
            cfg.num_nodes,
            precision,
            find_unused_parameters=find_unused_parameters,
        )

    def _loaders(
        self, fabric: Fabric, data: TrainingData, collate: Callable[[list[Any]], Any] | None
    ) -> dict[str, DataLoader | None]:
        loaders: dict[str, DataLoader | None] = {
            "train": fabric.setup_dataloaders(
                self._train_loader(fabric, data.train, collate), use_distributed_sampler=False
            )
        }
        for key in ("val_normal", "val_abnormal"):
            dataset = getattr(data, key)
            loaders[key] = (
                fabric.setup_dataloaders(
                    self._validation_loader(dataset), use_distributed_sampler=False
                )
                if dataset is not None and len(dataset) > 0
                else None
            )
        return loaders

    def _train_loader(
        self, fabric: Fabric, dataset: Dataset, collate: Callable[[list[Any]], Any] | None
    ) -> DataLoader:
        cfg = self.config
        common: dict[str, Any] = {"num_workers": cfg.num_workers, "worker_init_fn": _reseed_worker}
        several = has_several_shapes(dataset)
        if several and collate is not None:
            common["collate_fn"] = collate
        elif several:
            batches = ShapeBatchSampler(
                dataset.shapes,  # type: ignore[attr-defined]
                cfg.batch_size,
                shuffle=True,
                seed=cfg.seed,
                num_replicas=fabric.world_size,
                rank=fabric.global_rank,
            )
            return DataLoader(dataset, batch_sampler=batches, **common)
        if fabric.world_size > 1:
            sampler: Sampler = DistributedSampler(
                dataset, fabric.world_size, fabric.global_rank, shuffle=True, seed=cfg.seed
            )
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator())
        return DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            drop_last=len(dataset) > cfg.batch_size,
            **common,
        )

    def _validation_loader(self, dataset: Dataset) -> DataLoader:
        cfg = self.config
        if has_several_shapes(dataset):
            batches = ShapeBatchSampler(dataset.shapes, cfg.batch_size, shuffle=False)  # type: ignore[attr-defined]
            return DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers)
        return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers)

    def _run_epoch(
        self,
        fabric: Fabric,
        model: nn.Module,
        optimizers: Optimizers,
        task: TrainingTask,
        loaders: dict[str, DataLoader | None],
        epoch: int,
    ) -> dict[str, float]:
        train_loader = loaders["train"]
        sampler = train_loader.sampler
        if isinstance(train_loader.batch_sampler, ShapeBatchSampler):
            train_loader.batch_sampler.set_epoch(epoch)
        elif isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
            sampler.generator.manual_seed(epoch_seed(self.config.seed, epoch))
        model.train()
        step = task.step or _minimise_loss(task.loss)
        total, count = 0.0, 0
        layout = self.memory_format_used
        for index, batch in enumerate(train_loader):
            batch = to_layout(batch, layout)
            loss = step(model, batch, optimizers, fabric.backward, index)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at epoch {epoch + 1}; lower the "
                    "learning rate or check the input scaling"
                )
            total += loss.item() * batch_size(batch)
            count += batch_size(batch)
        row = {"epoch": float(epoch + 1), "train_loss": total / max(count, 1)}
        row.update(_evaluate(model, task, loaders, layout))
        return row


def make_fabric(
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    precision: str = "32-true",
    find_unused_parameters: bool = False,
) -> Fabric:
    """A Lightning Fabric over ``devices`` x ``num_nodes`` processes, launched when several.

    One process runs as it is; several run data-parallel (DDP: NCCL on GPUs, gloo on CPUs).
    Fabric starts the other local processes itself, or takes them from ``torchrun`` or a
    cluster launcher.

    Args:
        accelerator: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"gpu"``.
        devices: Processes (devices) per node.
        num_nodes: Machines.
        precision: A Fabric precision.
        find_unused_parameters: DDP's option, for steps that use part of the network.
    """
    distributed = devices > 1 or num_nodes > 1
    fabric = Fabric(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        precision=precision,
        # a custom step (GAN) uses part of the network per optimiser step
        strategy=DDPStrategy(find_unused_parameters=find_unused_parameters)
        if distributed
        else "auto",
    )
    if distributed:
        fabric.launch()
    return fabric


def _reseed(dataset: Dataset, *key: int) -> None:
    """Give the dataset's augmentation a random state derived from ``key`` (seed, epoch, rank)."""
    reseed = getattr(dataset, "reseed", None)
    if reseed is not None:
        reseed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]) % 2**31)


def _reseed_worker(worker_id: int) -> None:
    """DataLoader workers hold copies of the dataset: give each its own augmentation stream."""
    info = torch.utils.data.get_worker_info()
    if info is not None:
        _reseed(info.dataset, info.seed % 2**31, worker_id)


def batch_size(batch: torch.Tensor | tuple | list) -> int:
    """Images in a batch: a tensor ``(B, ...)`` or a tuple whose first item is one."""
    return len(batch[0]) if isinstance(batch, tuple | list) else len(batch)


def _minimise_loss(loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> TrainingStep:
    """The default training step: one optimiser minimises ``loss_fn``."""

    def step(
        model: nn.Module, batch: torch.Tensor, optimizers: Optimizers, backward: Backward, _: int
    ) -> torch.Tensor:
        (optimizer,) = optimizers.values()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        if torch.isfinite(loss):
            backward(loss)
            optimizer.step()
        return loss.detach()

    return step


def stage_file(name: str, stage: str) -> str:
    """``checkpoint.safetensors`` -> ``checkpoint_<stage>.safetensors`` (same if no ``stage``)."""
    if not stage:
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}_{stage}{dot}{suffix}"


def same_configuration(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """True when a checkpoint's configuration is ``current``'s, so the run may resume.

    An ``engine`` setting that a later version added (``memory_format``, ``compile``) is
    missing from older checkpoints; at its default it does not make the two differ.
    """
    saved_engine, engine = saved.get("engine"), current.get("engine")
    if saved == current or not isinstance(saved_engine, dict) or not isinstance(engine, dict):
        return saved == current
    defaults = {field.name: field.default for field in fields(EngineConfig)}
    added_at_default = {
        key
        for key in engine.keys() - saved_engine.keys()
        if key in defaults and engine[key] == defaults[key]
    }
    kept = {key: value for key, value in engine.items() if key not in added_at_default}
    return saved == {**current, "engine": kept}


def _probe(network: nn.Module, work: Callable[..., None], compiled: nn.Module, batch: Any) -> None:
    """One training pass through ``compiled`` that leaves ``network``'s state as it was."""
    with untouched(network):
        work(batch, compiled)


def _evaluate(
    model: nn.Module,
    task: TrainingTask,
    loaders: dict[str, DataLoader | None],
    layout: str = "contiguous",
) -> dict[str, float]:
    """Validation loss on normal images, mean scores of each group and their AUROC."""
    model.eval()
    out: dict[str, float] = {}
    normal = abnormal = None
    losses: list[float] = []
    with torch.no_grad():
        if task.before_validation is not None:
            task.before_validation(model)
        if loaders["val_normal"] is not None:
            normal = _validation_scores(model, task, loaders["val_normal"], losses, layout)
            out["val_loss"] = sum(losses) / len(normal)
            out["val_score_normal"] = float(normal.mean())
        if loaders["val_abnormal"] is not None:
            abnormal_losses = losses if task.supervised else None
            abnormal = _validation_scores(
                model, task, loaders["val_abnormal"], abnormal_losses, layout
            )
            out["val_score_abnormal"] = float(abnormal.mean())
    if task.supervised and losses:
        out["val_loss"] = sum(losses) / sum(len(s) for s in (normal, abnormal) if s is not None)
    if normal is not None and abnormal is not None:
        values = torch.cat([normal, abnormal]).numpy()
        if np.isfinite(values).all():
            labels = np.r_[np.zeros(len(normal)), np.ones(len(abnormal))]
            out["val_auroc"] = float(roc_auc_score(labels, values))
    return out


def _validation_scores(
    model: nn.Module,
    task: TrainingTask,
    loader: DataLoader,
    losses: list[float] | None,
    layout: str = "contiguous",
) -> torch.Tensor:
    """Scores of every image of ``loader``; appends each batch's summed loss to ``losses``."""
    scores = []
    for batch in loader:
        batch = to_layout(batch, layout)
        if losses is not None:
            losses.append(task.loss(model, batch).item() * batch_size(batch))
        scores.append(task.score(model, batch).float().cpu())
    return torch.cat(scores)


@dataclass
class _RunState:
    """Everything a resumed run needs besides the network and optimiser."""

    best_state: dict[str, torch.Tensor]
    epoch: int = 0
    best_rank: tuple[float, float] = (math.inf, math.inf)
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict[str, float]] | None = None
    memory_format: str | None = None
    """The training layout the run chose; a resumed run keeps it (bit-for-bit resume)."""

    def __post_init__(self) -> None:
        self.history = self.history or []

    def record(
        self, row: dict[str, float], network: nn.Module, patience: int | None, monitor: str
    ) -> None:
        self.history.append(row)
        self.epoch += 1
        monitored = _rank(row, monitor)
        if monitored < self.best_rank:
            self.best_rank, self.bad_epochs = monitored, 0
            self.best_state = _cpu_state(network)
        else:
            self.bad_epochs += 1
            self.stopped = patience is not None and self.bad_epochs >= patience

    def save(
        self,
        path: Path,
        network: nn.Module,
        optimizers: Optimizers,
        extra_state: dict[str, Any] | None,
    ) -> None:
        save_state(
            {
                "epoch": self.epoch,
                "best_rank": self.best_rank,
                "bad_epochs": self.bad_epochs,
                "stopped": self.stopped,
                "history": self.history,
                "memory_format": self.memory_format,
                "best_state": self.best_state,
                "network": _cpu_state(network),
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "extra_state": extra_state or {},
            },
            path,
        )

    @classmethod
    def restore(
        cls,
        path: Path,
        network: nn.Module,
        optimizers: Optimizers,
        extra_state: dict[str, Any] | None,
    ) -> _RunState:
        saved = load_state(path)
        if extra_state is not None and not same_configuration(saved["extra_state"], extra_state):
            raise ConfigError(
                f"{path}: the checkpoint was written by a run with a different configuration; "
                "use a new run directory or the same config to resume"
            )
        network.load_state_dict(saved["network"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(saved["optimizers"][name])
        return cls(
            best_state=saved["best_state"],
            epoch=saved["epoch"],
            best_rank=tuple(saved["best_rank"]),
            bad_epochs=saved["bad_epochs"],
            stopped=saved["stopped"],
            history=saved["history"],
            memory_format=saved.get("memory_format"),
        )


def _rank(row: dict[str, float], monitor: str) -> tuple[float, float]:
    """Sort key of an epoch (lower is better): ``(-AUROC, loss)`` or ``(loss, 0)``."""
    loss = row.get("val_loss", row["train_loss"])
    if monitor == "val_auroc" and "val_auroc" in row:
        return (-row["val_auroc"], loss)
    return (loss, 0.0)


def _cpu_state(network: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    """Write the history CSV (one row per epoch) atomically."""
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    lines = [",".join(columns)]
    for row in history:
        lines.append(",".join("" if row.get(c) is None else f"{row[c]:.6g}" for c in columns))
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_history(run_dir: str | Path, stage: str = "") -> list[dict[str, float]]:
    """Read a run's history CSV back as a list of dicts of floats."""
    with open(Path(run_dir) / stage_file(HISTORY_NAME, stage), newline="") as handle:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(handle)
        ]


def split_indices(
    n: int, fraction: float, seed: int, minimum: int = VAL_MIN
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (train, held-out) index arrays, deterministic by ``seed``.

    With ``fraction > 0``, ``round(n * fraction)`` items are held out (at least one when
    ``n > 1``), and at least ``minimum`` when that leaves two thirds of ``n`` for training
    (``n >= 3 * minimum``). A smaller set cannot spare them without starving the model.
    """
    order = np.random.default_rng(seed).permutation(n)
    n_held = int(round(n * fraction))
    if fraction > 0:
        if n >= 3 * minimum:
            n_held = max(n_held, minimum)
        if n_held == 0 and n > 1:
            n_held = 1
    return np.sort(order[n_held:]), np.sort(order[:n_held])
