"""The one training loop every deep detector uses.

The engine runs on the CPU, one GPU (with automatic mixed precision) or several GPUs and
nodes through Lightning Fabric (``devices``/``num_nodes``; under ``torchrun`` Fabric picks the
environment up). It keeps a per-epoch history, writes an atomic checkpoint every epoch, stops
early on the normal validation loss and resumes an interrupted run bit-for-bit: each epoch's
shuffling and dropout draw from a generator seeded by ``(seed, epoch)``, not from state that a
crash would lose.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from medanomaly.checkpoint import atomic_torch_save, atomic_write_text
from medanomaly.errors import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.csv"


@dataclass(frozen=True)
class EngineConfig:
    """Training settings shared by every deep detector (the ``engine:`` block of a config).

    Attributes:
        epochs: Maximum number of passes over the training data.
        batch_size: Images per optimisation step (per device).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        seed: Seeds weight initialisation, shuffling, dropout and the validation split.
        patience: Stop after this many epochs without a better normal validation loss;
            ``None`` never stops early.
        val_fraction: Share of the normal training images held out for validation when no
            validation set is given.
        accelerator: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"gpu"``.
        devices: Devices per node (``N`` runs data-parallel over ``N`` GPUs).
        num_nodes: Number of machines (launch with ``torchrun`` or a cluster launcher).
        precision: ``"auto"`` (16-bit mixed on GPU, 32-bit on CPU) or any Fabric precision.
        num_workers: DataLoader worker processes.
        progress: Show a progress bar with the running loss.
    """

    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    patience: int | None = 10
    val_fraction: float = 0.1
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    precision: str = "auto"
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("engine: epochs and batch_size must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"engine: val_fraction must be in [0, 1), got {self.val_fraction}")

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


@dataclass
class TrainingTask:
    """What the engine needs from a detector: a network and how to compute its losses.

    Attributes:
        network: The module to optimise.
        loss: ``loss(network, batch) -> scalar tensor`` used for training and validation.
        score: ``score(network, batch) -> (B,) tensor`` of anomaly scores, for the history
            of labelled validation data (seed 000, Fig. 2).
    """

    network: nn.Module
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    score: Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass
class TrainingData:
    """Datasets of the run; each item is a tensor ``(C, *spatial)``."""

    train: Dataset
    val_normal: Dataset | None = None
    val_abnormal: Dataset | None = None


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's shuffling and dropout (stable across interruptions)."""
    return (seed * 1_000_003 + epoch) % (2**31)


def resolve_precision(config: EngineConfig) -> str:
    """Turn ``precision='auto'`` into 16-bit mixed precision on GPU and 32-bit on CPU."""
    if config.precision != "auto":
        return config.precision
    wants_gpu = config.accelerator in ("auto", "cuda", "gpu")
    return "16-mixed" if wants_gpu and torch.cuda.is_available() else "32-true"


class Engine:
    """Owns the training loop: optimiser, epochs, early stopping, history and checkpoints.

    Args:
        config: The training settings.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.is_global_zero = True

    def fit(
        self,
        task: TrainingTask,
        data: TrainingData,
        run_dir: str | Path | None = None,
        resume: bool = False,
        extra_state: dict[str, Any] | None = None,
    ) -> list[dict[str, float]]:
        """Train ``task.network`` in place and leave the best weights loaded in it.

        Args:
            task: The network and its loss/score functions.
            data: Training and validation datasets.
            run_dir: Folder for ``checkpoint.pt`` and ``history.csv``; ``None`` keeps nothing.
            resume: Continue from ``run_dir/checkpoint.pt`` if it exists.
            extra_state: Stored in each checkpoint so that a resumed run can check it
                continues the same experiment (the resolved config).

        Returns:
            The per-epoch history (one dict per epoch).
        """
        cfg = self.config
        fabric = self._make_fabric()
        self.is_global_zero = fabric.is_global_zero
        network = task.network
        if fabric.world_size > 1 and fabric.device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(network)
        optimizer = torch.optim.Adam(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        state = _RunState(best_state=_cpu_state(network))
        checkpoint_path = Path(run_dir) / CHECKPOINT_NAME if run_dir else None
        if resume and checkpoint_path is not None and checkpoint_path.exists():
            state = _RunState.restore(checkpoint_path, network, optimizer, extra_state)
            log.info("resuming %s at epoch %d", checkpoint_path, state.epoch)
        model, optimizer = fabric.setup(network, optimizer)
        loaders = self._loaders(fabric, data)
        bar = tqdm(
            total=cfg.epochs,
            initial=state.epoch,
            desc="epochs",
            # None: tqdm shows the bar on a terminal only, keeping logs of batch jobs clean
            disable=None if cfg.progress and fabric.is_global_zero else True,
        )
        while state.epoch < cfg.epochs and not state.stopped:
            torch.manual_seed(epoch_seed(cfg.seed, state.epoch))
            row = self._run_epoch(fabric, model, optimizer, task, loaders, state.epoch)
            state.record(row, network, cfg.patience)
            if checkpoint_path is not None and fabric.is_global_zero:
                state.save(checkpoint_path, network, optimizer, extra_state)
                _write_history(Path(run_dir), state.history)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "epoch"})
        bar.close()
        network.load_state_dict(state.best_state)
        return state.history

    def _make_fabric(self) -> Fabric:
        cfg = self.config
        fabric = Fabric(
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            num_nodes=cfg.num_nodes,
            precision=resolve_precision(cfg),
        )
        if cfg.devices > 1 or cfg.num_nodes > 1:
            fabric.launch()
        return fabric

    def _loaders(self, fabric: Fabric, data: TrainingData) -> dict[str, DataLoader | None]:
        cfg = self.config
        if fabric.world_size > 1:
            sampler = DistributedSampler(
                data.train, fabric.world_size, fabric.global_rank, shuffle=True, seed=cfg.seed
            )
        else:
            sampler = RandomSampler(data.train, generator=torch.Generator())
        train = DataLoader(
            data.train,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.num_workers,
            drop_last=len(data.train) > cfg.batch_size,
        )
        loaders: dict[str, DataLoader | None] = {
            "train": fabric.setup_dataloaders(train, use_distributed_sampler=False)
        }
        for key in ("val_normal", "val_abnormal"):
            dataset = getattr(data, key)
            loaders[key] = (
                fabric.setup_dataloaders(
                    DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers),
                    use_distributed_sampler=False,
                )
                if dataset is not None and len(dataset) > 0
                else None
            )
        return loaders

    def _run_epoch(
        self,
        fabric: Fabric,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        task: TrainingTask,
        loaders: dict[str, DataLoader | None],
        epoch: int,
    ) -> dict[str, float]:
        train_loader = loaders["train"]
        sampler = train_loader.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
            sampler.generator.manual_seed(epoch_seed(self.config.seed, epoch))
        model.train()
        total, count = 0.0, 0
        for batch in train_loader:
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at epoch {epoch + 1}; lower the "
                    "learning rate or check the input scaling"
                )
            fabric.backward(loss)
            optimizer.step()
            total += loss.item() * len(batch)
            count += len(batch)
        row = {"epoch": float(epoch + 1), "train_loss": total / max(count, 1)}
        row.update(_evaluate(model, task, loaders))
        return row


def _evaluate(
    model: nn.Module, task: TrainingTask, loaders: dict[str, DataLoader | None]
) -> dict[str, float]:
    """Validation loss on normal images and mean scores of each validation group."""
    model.eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        if loaders["val_normal"] is not None:
            losses, scores = [], []
            for batch in loaders["val_normal"]:
                losses.append(task.loss(model, batch).item() * len(batch))
                scores.append(task.score(model, batch).float().cpu())
            n = sum(len(s) for s in scores)
            out["val_loss"] = sum(losses) / n
            out["val_score_normal"] = float(torch.cat(scores).mean())
        if loaders["val_abnormal"] is not None:
            scores = [task.score(model, b).float().cpu() for b in loaders["val_abnormal"]]
            out["val_score_abnormal"] = float(torch.cat(scores).mean())
    return out


@dataclass
class _RunState:
    """Everything a resumed run needs besides the network and optimiser."""

    best_state: dict[str, torch.Tensor]
    epoch: int = 0
    best_loss: float = math.inf
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict[str, float]] | None = None

    def __post_init__(self) -> None:
        self.history = self.history or []

    def record(self, row: dict[str, float], network: nn.Module, patience: int | None) -> None:
        self.history.append(row)
        self.epoch += 1
        monitored = row.get("val_loss", row["train_loss"])
        if monitored < self.best_loss:
            self.best_loss, self.bad_epochs = monitored, 0
            self.best_state = _cpu_state(network)
        else:
            self.bad_epochs += 1
            self.stopped = patience is not None and self.bad_epochs >= patience

    def save(
        self,
        path: Path,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        extra_state: dict[str, Any] | None,
    ) -> None:
        atomic_torch_save(
            {
                "epoch": self.epoch,
                "best_loss": self.best_loss,
                "bad_epochs": self.bad_epochs,
                "stopped": self.stopped,
                "history": self.history,
                "best_state": self.best_state,
                "network": _cpu_state(network),
                "optimizer": optimizer.state_dict(),
                "extra_state": extra_state or {},
            },
            path,
        )

    @classmethod
    def restore(
        cls,
        path: Path,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        extra_state: dict[str, Any] | None,
    ) -> _RunState:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if extra_state is not None and saved["extra_state"] != extra_state:
            raise ConfigError(
                f"{path}: the checkpoint was written by a run with a different configuration; "
                "use a new run directory or the same config to resume"
            )
        network.load_state_dict(saved["network"])
        optimizer.load_state_dict(saved["optimizer"])
        return cls(
            best_state=saved["best_state"],
            epoch=saved["epoch"],
            best_loss=saved["best_loss"],
            bad_epochs=saved["bad_epochs"],
            stopped=saved["stopped"],
            history=saved["history"],
        )


def _cpu_state(network: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}


def _write_history(run_dir: Path, history: list[dict[str, float]]) -> None:
    """Write ``history.csv`` (one row per epoch) atomically."""
    columns: list[str] = []
    for row in history:
        columns.extend(k for k in row if k not in columns)
    lines = [",".join(columns)]
    for row in history:
        lines.append(",".join("" if row.get(c) is None else f"{row[c]:.6g}" for c in columns))
    atomic_write_text(run_dir / HISTORY_NAME, "\n".join(lines) + "\n")


def read_history(run_dir: str | Path) -> list[dict[str, float]]:
    """Read ``history.csv`` back as a list of dicts of floats."""
    with open(Path(run_dir) / HISTORY_NAME, newline="") as handle:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(handle)
        ]


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (train, held-out) index arrays, deterministic by ``seed``."""
    order = np.random.default_rng(seed).permutation(n)
    n_held = int(round(n * fraction))
    if fraction > 0 and n_held == 0 and n > 1:
        n_held = 1
    return np.sort(order[n_held:]), np.sort(order[:n_held])
