import numpy as np
import pytest

from medanomaly.errors import InvalidImageError
from medanomaly.image import MedicalImage
from medanomaly.transforms import FOREGROUND_KEY, build_transforms
from medanomaly.transforms.mask import head_ct_brain_masks

SIZE = 200


def _head_ct(windowed: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A head CT slice: scalp, skull, brain, a bleed against the skull, text in a corner.

    ``windowed``: an 8-bit brain window in which the bleed is as bright as bone (as in the
    head_ct_hemorrhage PNGs); else Hounsfield units.
    """
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(float)
    radius = np.hypot((yy - 100) / 1.15, xx - 100)
    head, inner_scalp, inner_skull = radius < 80, radius < 76, radius < 68
    skull = inner_scalp & ~inner_skull
    angle = np.degrees(np.arctan2(yy - 100, xx - 100))
    bleed = inner_skull & (radius >= 52) & (np.abs(angle) < 35)  # a lens against the skull
    text = np.zeros((SIZE, SIZE), bool)
    text[4:14, 4:30] = True
    hu = np.full((SIZE, SIZE), -1000.0)
    hu[head] = 40.0  # scalp
    hu[skull] = 1200.0
    hu[inner_skull] = 30.0 + np.random.default_rng(0).normal(0, 4, inner_skull.sum())
    hu[bleed] = 70.0
    hu[text] = 3000.0  # burnt-in annotation
    parts = {"skull": skull, "brain": inner_skull & ~bleed, "bleed": bleed, "text": text}
    if not windowed:
        return hu.astype(np.float32), parts
    window = np.clip((hu - 0.0) / 80.0, 0.0, 1.0) * 255.0
    window[bleed] = 255.0  # saturated, like bone
    return window.astype(np.float32), parts


@pytest.mark.parametrize("windowed", [False, True], ids=["hu", "8-bit"])
def test_brain_mask_drops_skull_and_text_and_keeps_a_bleed_by_the_skull(windowed):
    image, parts = _head_ct(windowed)
    mask = head_ct_brain_masks(image[None])[0]
    assert mask[parts["skull"]].mean() < 0.05
    assert not mask[parts["text"]].any()
    assert mask[parts["brain"]].mean() > 0.95
    # all but a band of about half a skull thickness (4 of the lens's 17 px of depth)
    assert mask[parts["bleed"]].mean() > 0.6
    assert not mask[~(parts["brain"] | parts["bleed"] | parts["skull"])].any()


def test_transform_strips_a_volume_slice_by_slice():
    image, parts = _head_ct(windowed=False)
    volume = np.repeat(image[:, :, None], 3, axis=2)[None]  # axial slices along axis 2
    transform = build_transforms([{"head_ct_brain_mask": {"strip": True, "axis": 2}}])
    out = transform(MedicalImage(volume, (0.5, 0.5, 2.0)))
    brain = out.meta[FOREGROUND_KEY]
    assert brain.shape == volume.shape[1:]
    assert np.array_equal(brain[..., 0], brain[..., 2])
    assert np.all(out.array[0][~brain] == -1000.0)  # background: the image minimum
    assert not brain[parts["skull"]].mean() > 0.05


def test_errors_name_the_problem():
    image, _ = _head_ct(windowed=True)
    with pytest.raises(InvalidImageError, match="channel 2 does not exist"):
        build_transforms([{"head_ct_brain_mask": {"channel": 2}}])(
            MedicalImage(image[None], (1.0, 1.0))
        )
    with pytest.raises(Exception, match="strip"):
        build_transforms([{"head_ct_brain_mask": {"strip": "maybe"}}])
