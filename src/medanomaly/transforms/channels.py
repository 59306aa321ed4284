"""Channel selection for colour and multi-channel pictures (e.g. red and green of a fundus)."""

from __future__ import annotations

from collections.abc import Sequence

from medanomaly.errors import InvalidImageError
from medanomaly.image import MedicalImage
from medanomaly.transforms._base import (
    Transform,
    as_int,
    as_sequence,
    check_image,
    config_error,
    source_of,
)


class SelectChannels(Transform):
    """Keep the listed channels, in the order given.

    Read the picture with ``data.read_options: {keep_channels: true}`` first, or the colour
    is already merged to gray. The fundus part of the f-AnoGAN slide deck drops the blue
    channel of fundus photographs: ``select_channels: {channels: [0, 1]}``.

    Args:
        channels: Indices of the channels to keep (each at least 0, no repeats).
    """

    name = "select_channels"

    def __init__(self, channels: Sequence[int] = (0,)) -> None:
        values = as_sequence(self.name, "channels", channels)
        self.channels = [as_int(self.name, "channels", c, minimum=0) for c in values]
        if not self.channels:
            raise config_error(self.name, "channels", "must list at least one channel")
        if len(set(self.channels)) != len(self.channels):
            raise config_error(self.name, "channels", f"repeats a channel ({self.channels})")

    def __call__(self, image: MedicalImage) -> MedicalImage:
        """Return the image with only the selected channels."""
        check_image(self.name, image)
        count = image.array.shape[0]
        if max(self.channels) >= count:
            raise InvalidImageError(
                source_of(image),
                f"the image has {count} channel(s); the run takes channels {self.channels} "
                f"({len(self.channels)} channel(s)); a colour run needs colour pictures read "
                "with data.read_options keep_channels: true",
            )
        meta = {**image.meta, "channels_selected": list(self.channels)}
        return image.with_array(image.array[self.channels], meta=meta)
