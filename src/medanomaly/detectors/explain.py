"""Where a classifier looks: occlusion sensitivity (Lin et al. 2021) and Grad-CAM, in 2D and 3D.

* :func:`occlusion_sensitivity`: a gray patch slides over the input; at every position the
  drop of the abnormal probability (clean minus occluded) is added to the voxels the patch
  covered; each voxel ends with the mean drop over the patches that covered it. Positive =
  the region speaks for "abnormal". One forward pass per patch position.
* :func:`grad_cam`: the activations of a late convolutional layer weighted by the spatial
  mean of their gradients (Selvaraju et al. 2017), ReLU, upsampled to the input grid. One
  forward and one backward pass.

:func:`save_explanation_figure` draws input | map | map ... for the report gallery.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from medanomaly.detectors.scoring import patch_starts

Predict = Callable[[torch.Tensor], torch.Tensor]
_INTERPOLATION = {2: "bilinear", 3: "trilinear"}


def default_patch(spatial: Sequence[int]) -> int:
    """Default occlusion patch side: an eighth of the smallest side (at least 1)."""
    return max(1, min(spatial) // 8)


def occlusion_sensitivity(
    predict: Predict,
    images: torch.Tensor,
    patch: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    fill: float | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Occlusion sensitivity maps of a batch.

    Args:
        predict: ``predict(x) -> (B,)`` probability of "abnormal" for images ``x``.
        images: ``(B, C, *spatial)``.
        patch: Side of the gray patch (one value or one per axis); default
            :func:`default_patch`.
        stride: Step between patch positions; default half the patch.
        fill: Value of the patch; default each image's mean (a gray patch).
        batch_size: Occluded copies per forward pass.

    Returns:
        ``(B, *spatial)`` mean drop of the abnormal probability when each voxel is covered.
    """
    spatial = tuple(images.shape[2:])
    patches = _per_axis(patch if patch is not None else default_patch(spatial), len(spatial))
    steps = _per_axis(
        stride if stride is not None else [max(1, p // 2) for p in patches], len(spatial)
    )
    boxes = [
        tuple(slice(s, s + p) for s, p in zip(start, patches, strict=True))
        for start in itertools.product(
            *(patch_starts(n, p, st) for n, p, st in zip(spatial, patches, steps, strict=True))
        )
    ]
    return torch.stack([_occlude_one(predict, x, boxes, fill, batch_size) for x in images])


def _per_axis(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    values = tuple(int(v) for v in value) if isinstance(value, Sequence) else (int(value),) * n
    if len(values) != n or min(values) < 1:
        raise ValueError(f"need {n} positive patch/stride values, got {value!r}")
    return values


def _occlude_one(
    predict: Predict,
    image: torch.Tensor,
    boxes: list[tuple[slice, ...]],
    fill: float | None,
    batch_size: int,
) -> torch.Tensor:
    """Occlusion map of one image ``(C, *spatial)`` over the patch ``boxes``."""
    value = float(image.mean()) if fill is None else float(fill)
    clean = predict(image[None]).reshape(()).float()
    total = torch.zeros(image.shape[1:], dtype=torch.float32, device=image.device)
    count = torch.zeros_like(total)
    for first in range(0, len(boxes), batch_size):
        chunk = boxes[first : first + batch_size]
        batch = image[None].repeat(len(chunk), *([1] * image.ndim))
        for i, box in enumerate(chunk):
            batch[(i, slice(None), *box)] = value
        drops = clean - predict(batch).reshape(-1).float()
        for box, drop in zip(chunk, drops, strict=True):
            total[box] += drop
            count[box] += 1
    return total / count.clamp(min=1)


def grad_cam(
    network: nn.Module,
    layer: nn.Module,
    images: torch.Tensor,
    target: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Grad-CAM maps of a batch, upsampled to the input grid.

    Works under ``torch.no_grad()`` and ``torch.inference_mode()`` too (gradients are
    switched on inside). The network is
    used as it is (call ``eval()`` first for inference behaviour of batch norm and dropout).

    Args:
        network: Maps images ``(B, C, *spatial)`` to logits ``(B, K)``.
        layer: A module inside ``network`` whose output ``(B, F, *grid)`` is combined.
        images: ``(B, C, *spatial)``.
        target: ``target(logits) -> (B,)``, the quantity explained; default the log-odds
            of class 1 against class 0 (``logits[:, 1] - logits[:, 0]``).

    Returns:
        ``(B, *spatial)`` non-negative maps.
    """
    target = target or _log_odds
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        # a normal (not inference-mode) copy of the input, so that a graph can be recorded
        with torch.inference_mode(False), torch.enable_grad():
            logits = network(images.detach().clone())
            activations = captured[-1]
            (gradients,) = torch.autograd.grad(target(logits).sum(), activations)
    finally:
        handle.remove()
    # float32 maps also from a network run under bf16 autocast
    activations, gradients = activations.detach().float(), gradients.float()
    axes = tuple(range(2, activations.ndim))
    weights = gradients.mean(dim=axes, keepdim=True)
    cam = torch.relu((weights * activations).sum(dim=1, keepdim=True))
    spatial = tuple(images.shape[2:])
    cam = functional.interpolate(
        cam.float(), size=spatial, mode=_INTERPOLATION[len(spatial)], align_corners=False
    )
    return cam[:, 0]


def _log_odds(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, 1] - logits[:, 0]


def save_explanation_figure(
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    path: str | Path,
    title: str = "",
) -> Path:
    """Save input | one overlay per map (each scaled to its own range, red = high).

    2D images give one row; 3D volumes three rows, the orthogonal planes through the voxel
    where the first map is largest.

    Args:
        image: ``(C, *spatial)`` (the middle channel is shown, e.g. the centre slice of a
            2.5D stack) or ``(*spatial)``.
        maps: Name -> map ``(*spatial)``.
        path: PNG file to write (atomically).
        title: Figure title.

    Returns:
        The path written.
    """
    from medanomaly.viz.case_figure import DIFF_CMAP, plt, save_figure  # matplotlib when drawing

    first = next(iter(maps.values()))
    if image.ndim == first.ndim + 1:
        image = image[image.shape[0] // 2]
    rows = _planes(image, maps, first)
    fig, axes = plt.subplots(
        len(rows), 1 + len(maps), figsize=(3 * (1 + len(maps)), 3 * len(rows)), squeeze=False
    )
    lo, hi = float(image.min()), float(image.max())
    for ax_row, (label, img, planes) in zip(axes, rows, strict=True):
        ax_row[0].imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax_row[0].set_title(f"input {label}".strip())
        for ax, (name, plane) in zip(ax_row[1:], planes.items(), strict=True):
            low, high = float(maps[name].min()), float(maps[name].max())
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            ax.imshow(plane, cmap=DIFF_CMAP, vmin=low, vmax=max(high, low + 1e-12), alpha=0.5)
            ax.set_title(name)
        for ax in ax_row:
            ax.axis("off")
    return save_figure(fig, path, title)


def _planes(
    image: np.ndarray, maps: dict[str, np.ndarray], first: np.ndarray
) -> list[tuple[str, np.ndarray, dict[str, np.ndarray]]]:
    """Rows of (label, image plane, {name: map plane})."""
    from medanomaly.viz.case_figure import orthogonal_slices

    if image.ndim == 2:
        return [("", image, maps)]
    point = np.unravel_index(int(np.argmax(first)), first.shape)
    rows = []
    for axis, img in enumerate(orthogonal_slices(image, point)):
        planes = {k: orthogonal_slices(v, point)[axis].T for k, v in maps.items()}
        rows.append((f"axis {axis} @ {point[axis]}", img.T, planes))
    return rows
