"""Unlabelled outlier screening of a folder of scans (Hjohlman 2022).

A trained detector of normal anatomy scores every case of an unlabelled folder; cases whose
score exceeds mean + k·SD of the run's held-out normal validation scores are flagged. Beside
the score, each case gets the numbers that tell *why* it may stand out, so that a reader can
separate real findings from acquisition problems:

* reconstruction error over all voxels (``mse``) and over the foreground only
  (``masked_mse``), and the foreground size (:mod:`~medanomaly.screening.residuals`);
* facts of the file as stored (a second, raw read without preprocessing): shape, voxel count,
  spacing, maximum and mean intensity, the fraction of voxels above a metal level (3000 HU);
  and oddities against the rest of the folder: original orientation differing from the
  folder's usual one, spacing more than 20 % from the folder median, strongly anisotropic
  voxels, problems the reader reported, a raw read that failed
  (:mod:`~medanomaly.screening.facts`);
* where the model has a latent space: DBSCAN clusters of the standardised latent vectors and a
  2D UMAP map of them (:mod:`~medanomaly.screening.latent`);
* size-bias diagnostics: Spearman correlations of both errors with the raw voxel count and the
  foreground voxel count, since a screen that mostly ranks big scans first is measuring size
  (:mod:`~medanomaly.screening.size_bias`).

:func:`screen` computes all of it (a :class:`ScreenResult`) from one pass over the cases,
chunk by chunk, and works on a streamed set or one rank's share of a distributed job
(:mod:`~medanomaly.screening.core`); :func:`save_gallery` draws the flagged cases
(:mod:`~medanomaly.screening.gallery`) and :func:`write_screen_outputs` writes ``screen.csv``,
``summary.json``, the figures (:mod:`~medanomaly.screening.plots`) and ``report.html``
(:mod:`~medanomaly.screening.report`, :mod:`~medanomaly.screening.outputs`).
:func:`screen_folder` is the whole ``medanomaly screen`` job (:mod:`~medanomaly.screening.job`).

May import: ``evaluation``, ``jobs``, ``outputs``, ``models``, ``detectors`` and the
layers below.
"""

from medanomaly.screening.core import DEFAULT_BATCH, DEFAULT_RULE, screen
from medanomaly.screening.facts import (
    ANISOTROPY_RATIO,
    DEFAULT_METAL_LEVEL,
    SPACING_TOLERANCE,
    RawFacts,
    compact_spacing,
    folder_oddities,
    raw_facts,
)
from medanomaly.screening.files import (
    CSV_FILE,
    GALLERY_DIR,
    REPORT_FILE,
    SIZE_BIAS_FILE,
    SKIPPED_FILE,
    SUMMARY_FILE,
    UMAP_SCORE_FILE,
    UMAP_SIZE_FILE,
)
from medanomaly.screening.gallery import gallery_scale, save_gallery
from medanomaly.screening.job import screen_folder
from medanomaly.screening.latent import (
    DEFAULT_MIN_SAMPLES,
    EPS_QUANTILE,
    MIN_LATENT_CASES,
    UMAP_NEIGHBOURS,
    UMAP_SEED,
    LatentClusters,
    latent_clusters,
    standardise,
    umap_embedding,
)
from medanomaly.screening.outputs import summary_line, write_screen_csv, write_screen_outputs
from medanomaly.screening.plots import plot_latent_map, plot_size_bias
from medanomaly.screening.report import REPORT_GALLERY_MAX, report_blocks
from medanomaly.screening.residuals import foreground_masks, reconstruction_errors
from medanomaly.screening.result import CSV_COLUMNS, ScreenResult
from medanomaly.screening.size_bias import ERRORS, SIZES, size_bias, spearman

__all__ = [
    "ANISOTROPY_RATIO",
    "CSV_COLUMNS",
    "CSV_FILE",
    "DEFAULT_BATCH",
    "DEFAULT_RULE",
    "DEFAULT_METAL_LEVEL",
    "DEFAULT_MIN_SAMPLES",
    "EPS_QUANTILE",
    "ERRORS",
    "GALLERY_DIR",
    "MIN_LATENT_CASES",
    "REPORT_FILE",
    "REPORT_GALLERY_MAX",
    "SIZES",
    "SIZE_BIAS_FILE",
    "SKIPPED_FILE",
    "SPACING_TOLERANCE",
    "SUMMARY_FILE",
    "UMAP_NEIGHBOURS",
    "UMAP_SCORE_FILE",
    "UMAP_SEED",
    "UMAP_SIZE_FILE",
    "LatentClusters",
    "RawFacts",
    "ScreenResult",
    "compact_spacing",
    "folder_oddities",
    "foreground_masks",
    "gallery_scale",
    "latent_clusters",
    "plot_latent_map",
    "plot_size_bias",
    "raw_facts",
    "reconstruction_errors",
    "report_blocks",
    "save_gallery",
    "screen",
    "screen_folder",
    "size_bias",
    "spearman",
    "standardise",
    "summary_line",
    "umap_embedding",
    "write_screen_csv",
    "write_screen_outputs",
]
