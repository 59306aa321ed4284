"""Noise fields the denoising and diffusion detectors perturb images with.

Three kinds, each drawn like a batch ``(B, C, *spatial)`` in 2D or 3D:

- ``gaussian``: independent N(0, 1) per voxel (Ho et al. 2020).
- ``coarse``: Gaussian values on a coarse lattice, upsampled (Kascenas et al. 2022): blobs
  of about ``side / grid`` voxels that a network learns to remove, and so "repairs" lesions.
- ``simplex``: octaves of simplex noise (Wyatt et al. 2022, AnoDDPM): smooth, structured
  noise over several scales, which hides large lesions better than white noise does.

Every function takes an optional ``torch.Generator``, so that scoring can draw the same
noise every time (training draws from torch's default generator, which the engine seeds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional

from medanomaly.errors import check_choice

NOISE_KINDS = ("gaussian", "simplex", "coarse")
COARSE_GRID = 16
"""Default lattice points per side of ``coarse`` noise (Kascenas et al. 2022: 16 at 128²)."""
SIMPLEX_GRID = 4
"""Default cycles per side of the coarsest simplex octave (Wyatt et al. 2022: 2^-6 per pixel at
256², i.e. 4 per side)."""
SIMPLEX_OCTAVES = 6
SIMPLEX_PERSISTENCE = 0.8
_TABLE = 256  # lattice hash table size of simplex noise (a power of two)


def coarse_noise(
    x: torch.Tensor,
    std: float,
    grid: int,
    shift: bool = False,
    lattice: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Smooth Gaussian noise like ``x``: drawn on a ``grid``-per-side lattice, upsampled.

    The denoising autoencoder of Kascenas et al. (2022) learns to remove such blob-sized
    perturbations, so that it also "repairs" lesions instead of copying them. The lattice is
    upsampled (bi/trilinear) to the image grid; with ``shift`` each image's noise is rolled by
    a random offset along every axis, so that the blobs do not sit on the same lattice in
    every image (the paper rolls the noise the same way).

    Args:
        x: Batch ``(B, C, *spatial)`` the noise is for.
        std: SD of the lattice values (in the image's intensity units).
        grid: Lattice points per side.
        shift: Roll each image's noise by a random offset (uniform over each axis).
        lattice: Use these lattice values ``(B, C, *(grid,) * d)`` instead of drawing them
            (tests); they are scaled by ``std``.
        generator: Draw from this generator (default: torch's).
    """
    spatial = x.shape[2:]
    if lattice is None:
        size = (x.shape[0], x.shape[1], *(grid,) * len(spatial))
        lattice = torch.randn(size, generator=generator, device=x.device)
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    noise = functional.interpolate(lattice.float(), size=spatial, mode=mode, align_corners=False)
    if shift:
        dims = tuple(range(1, len(spatial) + 1))
        device = "cpu" if generator is None else generator.device
        offsets = torch.stack(
            [
                torch.randint(0, n, (x.shape[0],), generator=generator, device=device)
                for n in spatial
            ],
            dim=1,
        ).tolist()
        noise = torch.stack(
            [torch.roll(n, tuple(off), dims) for n, off in zip(noise, offsets, strict=True)]
        )
    return noise.to(x.dtype) * std


def simplex_noise(
    shape: Sequence[int],
    grid: int = SIMPLEX_GRID,
    octaves: int = SIMPLEX_OCTAVES,
    persistence: float = SIMPLEX_PERSISTENCE,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Octaves of simplex noise ``shape`` = ``(B, C, *spatial)``, 2D or 3D (Wyatt et al. 2022).

    Octave ``o`` has ``grid * 2**o`` cycles per side and weight ``persistence**o``; octaves
    finer than two voxels per cycle are left out (they would alias into white noise). Each
    image and channel reads its own random region of one noise field (a random offset per
    octave), so images differ while one gradient table serves the batch.

    Args:
        shape: ``(B, C, *spatial)``.
        grid: Cycles per side of the coarsest octave.
        octaves: Octaves summed (Wyatt et al.: 6).
        persistence: Weight ratio of successive octaves (Wyatt et al.: 0.8).
        generator: Draw the gradients and offsets from this generator (default: torch's).
        device: Where the noise is made.

    Returns:
        Float32 noise, not yet standardised (see :func:`standardise`).
    """
    batch, channels, *spatial = (int(s) for s in shape)
    dims = len(spatial)
    draw = {"generator": generator, "device": "cpu" if generator is None else generator.device}
    gradients = torch.randn(_TABLE, dims, **draw)
    gradients = (gradients / gradients.norm(dim=1, keepdim=True)).to(device)
    perm = torch.randperm(_TABLE, **draw)
    perm = torch.cat([perm, perm]).to(device)
    axes = [torch.arange(n, dtype=torch.float32, device=device) / n for n in spatial]
    unit = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, dims)
    total = torch.zeros(batch * channels, unit.shape[0], device=device)
    for octave in range(max(1, octaves)):
        cycles = grid * 2**octave
        if octave and cycles > min(spatial) / 2:
            break
        offsets = torch.rand(batch * channels, 1, dims, **draw) * _TABLE
        points = unit.unsqueeze(0) * cycles + offsets.to(device)
        total += persistence**octave * _simplex(points.reshape(-1, dims), gradients, perm).view(
            batch * channels, -1
        )
    return total.view(batch, channels, *spatial)


def _simplex(points: torch.Tensor, gradients: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Simplex noise (Perlin 2001, in Gustavson's formulation) at ``points`` ``(P, d)``.

    The space is skewed so that the simplices become the cells' sorted corners; each of the
    ``d + 1`` corners of a point's simplex adds its random gradient's dot product with the
    offset to the point, faded by ``max(0, r² - |offset|²)^4``.
    """
    dims = points.shape[1]
    skew = (math.sqrt(dims + 1) - 1) / dims
    unskew = (1 - 1 / math.sqrt(dims + 1)) / dims
    cell = torch.floor(points + points.sum(dim=1, keepdim=True) * skew)
    first = points - (cell - cell.sum(dim=1, keepdim=True) * unskew)
    order = torch.argsort(first, dim=1, descending=True)
    steps = functional.one_hot(order, dims).to(points.dtype)  # (P, d, d): unit step per rank
    corners = torch.cat([torch.zeros_like(steps[:, :1]), steps.cumsum(dim=1)], dim=1)
    ranks = torch.arange(dims + 1, device=points.device, dtype=points.dtype).view(1, -1, 1)
    offsets = first.unsqueeze(1) - corners + ranks * unskew  # (P, d + 1, d)
    lattice = (cell.unsqueeze(1) + corners).long() & (_TABLE - 1)
    hashed = torch.zeros_like(lattice[..., 0])
    for axis in reversed(range(dims)):
        hashed = perm[lattice[..., axis] + hashed]
    radius = 0.5 if dims == 2 else 0.6
    fade = (radius - offsets.pow(2).sum(dim=-1)).clamp_min(0).pow(4)
    return (fade * (gradients[hashed] * offsets).sum(dim=-1)).sum(dim=1)


def standardise(noise: torch.Tensor) -> torch.Tensor:
    """Each image's and channel's noise field scaled to mean 0 and SD 1."""
    flat = noise.flatten(2)
    mean = flat.mean(dim=2, keepdim=True)
    sd = flat.std(dim=2, keepdim=True).clamp_min(1e-8)
    return ((flat - mean) / sd).view_as(noise)


def unit_noise(
    kind: str,
    like: torch.Tensor,
    grid: int | None = None,
    octaves: int = SIMPLEX_OCTAVES,
    persistence: float = SIMPLEX_PERSISTENCE,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noise of ``kind`` shaped like ``like``, each field standardised to mean 0, SD 1 (float32).

    ``gaussian`` is already so; ``coarse`` (shifted lattice) and ``simplex`` are standardised,
    so that a diffusion model may use any of them as its forward-process noise (Wyatt et al.
    2022 do so with simplex noise).

    Args:
        kind: ``gaussian``, ``simplex`` or ``coarse``.
        like: A batch ``(B, C, *spatial)``: the shape and device of the noise.
        grid: Lattice points (``coarse``) or coarsest cycles (``simplex``) per side; ``None``:
            16 for ``coarse``, 4 for ``simplex``.
        octaves: Simplex octaves.
        persistence: Simplex octave weight ratio.
        generator: Draw from this generator (default: torch's).
    """
    check_choice("noise", "kind", kind, NOISE_KINDS)
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, device=like.device)
    if kind == "coarse":
        grid = COARSE_GRID if grid is None else grid
        noise = coarse_noise(like.float(), 1.0, grid, shift=True, generator=generator)
    else:
        grid = SIMPLEX_GRID if grid is None else grid
        noise = simplex_noise(like.shape, grid, octaves, persistence, generator, like.device)
    return standardise(noise.float())
