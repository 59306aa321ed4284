"""The U-Net with skip connections of the denoising and synthetic-anomaly detectors."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import BasicUNet
from torch import nn

from medanomaly.errors import ConfigError

UNET_LEVELS = 6  # BasicUNet: five encoder widths (four down-samplings) + the last decoder width
CPU_FEATURES = (16, 32, 64, 128, 256, 16)  # widths scaled down for a CPU (paper: 64 to 512)


def skip_unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    features: Sequence[int],
    norm_groups: int = 8,
    owner: str = "unet",
) -> nn.Module:
    """MONAI's ``BasicUNet``: four down-samplings, skip connections, group normalisation.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        out_channels: Output channels (a linear last layer).
        features: Six widths: the five encoder levels and the last decoder level.
        norm_groups: Groups of the group normalisation (Kascenas et al. use group norm);
            every width must be divisible by it; 0 uses instance normalisation.
        owner: The detector's name, for errors.

    Raises:
        ConfigError: If ``features`` does not have six widths divisible by ``norm_groups``.
    """
    features = tuple(int(f) for f in features)
    if len(features) != UNET_LEVELS:
        raise ConfigError(
            f"{owner}: features needs {UNET_LEVELS} widths (five encoder levels and the last "
            f"decoder level, e.g. [16, 32, 64, 128, 256, 16]), got {list(features)}"
        )
    if norm_groups and any(f % norm_groups for f in features):
        raise ConfigError(
            f"{owner}: every width of features {list(features)} must be divisible by "
            f"norm_groups={norm_groups}"
        )
    norm = ("group", {"num_groups": norm_groups}) if norm_groups else ("instance", {"affine": True})
    return BasicUNet(spatial_dims, in_channels, out_channels, features=features, norm=norm)
