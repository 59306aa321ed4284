"""Galleries tell cases apart and cut 3D panels through the largest error inside the body."""

from __future__ import annotations

import numpy as np

from medanomaly.viz.case_figure import likely_foreground, peak_voxel, unique_names


def test_repeated_file_names_get_their_parent_folder() -> None:
    ids = ["/d/p1/T1c.nii.gz", "/d/p2/T1c.nii.gz", "/d/p2/flair.nii.gz", "/e/p1/T1c.nii.gz"]
    assert unique_names(ids) == ["d/p1/T1c.nii.gz", "p2/T1c.nii.gz", "flair.nii.gz",
                                 "e/p1/T1c.nii.gz"]  # fmt: skip
    assert len(set(unique_names(ids))) == len(ids)


def test_the_panel_voxel_lies_in_the_foreground_not_in_the_air() -> None:
    image = np.zeros((8, 8, 8), np.float32)
    image[2:6, 2:6, 2:6] = 1.0 + np.random.default_rng(0).random((4, 4, 4))
    diff = np.zeros_like(image)
    diff[0, 0, 0] = 9.0  # a weak model's largest error: in the background
    diff[3, 4, 5] = 2.0  # the largest error inside the body
    foreground = likely_foreground(image)
    assert foreground.sum() == 64
    assert peak_voxel(diff, foreground) == (3, 4, 5)
    assert peak_voxel(diff, None) == (0, 0, 0)


def test_an_image_without_a_flat_background_is_all_foreground() -> None:
    image = np.random.default_rng(1).random((6, 6, 6))
    assert likely_foreground(image).all()
