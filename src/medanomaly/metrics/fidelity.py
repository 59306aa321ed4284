"""Anatomical fidelity of reconstructions (Kobayashi et al. 2020): quality and overlap scores.

A segmentation network trained on normal anatomy of the same domain (any ``nn.Module``
returning class logits ``(B, K, *spatial)``, e.g. one made by
:func:`medanomaly.metrics.segmentation.train_segmenter`) segments each input image and its
reconstruction:

- **quality score** = mean per-pixel entropy of the softmax on the *input* minus the same on
  the *reconstruction* (Kobayashi et al. 2020, eq. 9, which sums over pixels instead;
  ``reduction="sum"``
  gives that). A blurry or otherwise out-of-distribution reconstruction makes the network
  unsure, raises the entropy on the reconstruction and makes the score negative; 0 means as
  confident as on the input; higher is better.
- **overlap score** = mean Dice between the argmax segmentations of input and reconstruction
  over the classes present (Kobayashi et al. 2020, eq. 10); 1 when they agree everywhere, higher is
  better.

Entropies are in nats (natural logarithm). Both scores are returned per image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from medanomaly.data.sets import ImageSet

REDUCTIONS = ("mean", "sum")
CLASS_SOURCES = ("either", "input")


@dataclass
class FidelityScores:
    """Per-image anatomical fidelity.

    Attributes:
        quality: Entropy on the input minus entropy on the reconstruction ``(N,)``
            (0 = as confident as on the input; negative = less confident).
        overlap: Mean Dice of the two segmentations over the present classes ``(N,)``.
    """

    quality: np.ndarray
    overlap: np.ndarray


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy (nats) of the softmax over the class axis: ``(B, *spatial)``."""
    log_p = functional.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def dice_overlap(
    first: torch.Tensor,
    second: torch.Tensor,
    n_classes: int,
    classes_from: str = "either",
    ignore_classes: Sequence[int] = (),
) -> torch.Tensor:
    """Mean Dice between two label maps ``(B, *spatial)`` over the classes present.

    Args:
        first: Labels of the inputs (integers in ``[0, n_classes)``).
        second: Labels of the reconstructions, same shape.
        n_classes: Number of classes.
        classes_from: ``either`` averages over the classes present in either map (a class
            the reconstruction invents counts as a miss); ``input`` over the classes of
            ``first`` only (Kobayashi et al.'s (2020) class set K).
        ignore_classes: Classes left out (e.g. ``(0,)`` for the background).

    Returns:
        ``(B,)`` Dice means; NaN for an image without any class to average over.
    """
    pairs = (first.long() * n_classes + second.long()).flatten(1)
    confusion = torch.zeros(
        pairs.shape[0], n_classes * n_classes, dtype=torch.float64, device=pairs.device
    )
    confusion.scatter_add_(1, pairs, torch.ones_like(pairs, dtype=torch.float64))
    confusion = confusion.view(-1, n_classes, n_classes)
    both = confusion.diagonal(dim1=1, dim2=2)
    one_a, one_b = confusion.sum(dim=2), confusion.sum(dim=1)
    present = one_a > 0 if classes_from == "input" else (one_a > 0) | (one_b > 0)
    if ignore_classes:
        present[:, list(ignore_classes)] = False
    dice = 2 * both / (one_a + one_b).clamp_min(1)
    count = present.sum(dim=1)
    mean = (dice * present).sum(dim=1) / count.clamp_min(1)
    return torch.where(count > 0, mean, torch.full_like(mean, float("nan"))).float()


def anatomical_fidelity(
    seg_net: nn.Module,
    images: ImageSet | np.ndarray | torch.Tensor,
    reconstructions: np.ndarray | torch.Tensor,
    reduction: str = "mean",
    classes_from: str = "either",
    ignore_classes: Sequence[int] = (),
    batch_size: int = 16,
) -> FidelityScores:
    """Quality and overlap scores of each reconstruction in one pass of ``seg_net``.

    Args:
        seg_net: Segmentation network returning logits ``(B, K, *spatial)``; it is run in
            eval mode without gradients on its own device (its train/eval mode is restored).
        images: Inputs ``(N, C, *spatial)``.
        reconstructions: Their reconstructions, same shape.
        reduction: ``mean`` (default) or ``sum`` (Kobayashi et al.'s (2020) scale) of the per-pixel
            entropies in the quality score.
        classes_from: Classes averaged by the overlap score: ``either`` or ``input``.
        ignore_classes: Classes left out of the overlap score.
        batch_size: Images per forward pass.

    Returns:
        The per-image :class:`FidelityScores`.

    Raises:
        ValueError: On mismatched shapes, a bad option or logits of the wrong shape.
    """
    _check_options(reduction, classes_from)
    quality, overlap = [], []
    for logits_x, logits_r in _paired_logits(seg_net, images, reconstructions, batch_size):
        entropy_x, entropy_r = softmax_entropy(logits_x), softmax_entropy(logits_r)
        reduce = torch.mean if reduction == "mean" else torch.sum
        quality.append(reduce(entropy_x.flatten(1), dim=1) - reduce(entropy_r.flatten(1), dim=1))
        overlap.append(
            dice_overlap(
                logits_x.argmax(dim=1),
                logits_r.argmax(dim=1),
                logits_x.shape[1],
                classes_from,
                ignore_classes,
            )
        )
    return FidelityScores(
        quality=torch.cat(quality).double().cpu().numpy(),
        overlap=torch.cat(overlap).double().cpu().numpy(),
    )


def quality_score(
    seg_net: nn.Module,
    images: ImageSet | np.ndarray | torch.Tensor,
    reconstructions: np.ndarray | torch.Tensor,
    reduction: str = "mean",
    batch_size: int = 16,
) -> np.ndarray:
    """Entropy of ``seg_net``'s softmax on each input minus on its reconstruction ``(N,)``.

    Negative when the network is less sure on the reconstruction (blur, artefacts); 0 when
    the reconstruction equals the input. See :func:`anatomical_fidelity` for the arguments.
    """
    return anatomical_fidelity(
        seg_net, images, reconstructions, reduction=reduction, batch_size=batch_size
    ).quality


def overlap_score(
    seg_net: nn.Module,
    images: ImageSet | np.ndarray | torch.Tensor,
    reconstructions: np.ndarray | torch.Tensor,
    classes_from: str = "either",
    ignore_classes: Sequence[int] = (),
    batch_size: int = 16,
) -> np.ndarray:
    """Mean Dice of the argmax segmentations of each input and its reconstruction ``(N,)``.

    1 when both segmentations agree everywhere. See :func:`anatomical_fidelity` for the
    arguments.
    """
    return anatomical_fidelity(
        seg_net,
        images,
        reconstructions,
        classes_from=classes_from,
        ignore_classes=ignore_classes,
        batch_size=batch_size,
    ).overlap


def _check_options(reduction: str, classes_from: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if classes_from not in CLASS_SOURCES:
        raise ValueError(f"classes_from must be one of {CLASS_SOURCES}, got {classes_from!r}")


def _as_array(x: ImageSet | np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(x, ImageSet):
        x = x.images
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    array = np.asarray(x, dtype=np.float32)
    if array.ndim not in (4, 5):
        raise ValueError(f"{name} must be (N, C, H, W) or (N, C, X, Y, Z), got {array.shape}")
    return array


def _paired_logits(
    seg_net: nn.Module,
    images: ImageSet | np.ndarray | torch.Tensor,
    reconstructions: np.ndarray | torch.Tensor,
    batch_size: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Logits of matching batches of inputs and reconstructions."""
    x = _as_array(images, "images")
    r = _as_array(reconstructions, "reconstructions")
    if x.shape != r.shape:
        raise ValueError(f"images {x.shape} and reconstructions {r.shape} differ in shape")
    parameter = next(seg_net.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = seg_net.training
    seg_net.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                pair = [torch.from_numpy(a[start : start + batch_size]).to(device) for a in (x, r)]
                logits = [seg_net(batch).float() for batch in pair]
                _check_logits(logits[0], pair[0])
                yield logits[0], logits[1]
    finally:
        seg_net.train(was_training)


def _check_logits(logits: torch.Tensor, batch: torch.Tensor) -> None:
    expected = (batch.shape[0], batch.shape[2:])
    if (logits.shape[0], logits.shape[2:]) != expected or logits.shape[1] < 2:
        raise ValueError(
            f"seg_net must return class logits (B, K >= 2, *spatial) for input "
            f"{tuple(batch.shape)}, got {tuple(logits.shape)}"
        )
