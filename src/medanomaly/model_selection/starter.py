"""The first hour of ``compare``: a built-in starter spec chosen by what the data look like.

``medanomaly compare --data D --out O`` without ``--spec`` reads one case of ``D`` to see
whether it holds 2D slices or 3D volumes, and how many channels, then runs the matching
starter (``starter_2d``, ``starter_3d`` or ``starter_rgb_2d``): the no-model rows, ``vae_map``,
``dae`` and their fusions at CPU sizes. ``--print-spec`` writes the same spec for editing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from medanomaly.builtin import builtin
from medanomaly.data.listing import Case, list_cases
from medanomaly.errors import ConfigError, MedanomalyError
from medanomaly.io import read_image
from medanomaly.io.dicomweb import RemoteSeries

log = logging.getLogger(__name__)

PROBED = 20
"""Cases tried, in listing order, for one that reads."""
PATH_LINE = "  path: data.csv\n"
LEVEL_LINE = "level: image\n"
"""The lines of a starter spec that the data decide."""


def data_shape(cases: list[Case], source: str | Path) -> tuple[int, int]:
    """Spatial dimensions and channels of the first readable case (with channels kept).

    A series in a DICOMweb archive counts as a one-channel volume without being retrieved.

    Raises:
        ConfigError: None of the first :data:`PROBED` cases can be read (the last reason).
    """
    problem = "no case listed"
    for case in cases[:PROBED]:
        if case.problem is not None:
            problem = case.problem
            continue
        if isinstance(case.path, RemoteSeries):
            return 3, 1
        try:
            image = read_image(case.path, keep_channels=True)
        except MedanomalyError as error:
            problem = str(error)
            continue
        return image.spatial_dims, int(image.array.shape[0])
    raise ConfigError(f"{source}: no readable case among the first {PROBED} ({problem})")


def starter_name(spatial_dims: int, channels: int) -> str:
    """The built-in starter spec for data of that dimensionality and channel count.

    Raises:
        ConfigError: 3D data with several channels, which no starter covers.
    """
    if spatial_dims == 3:
        if channels > 1:
            raise ConfigError(
                f"the data are 3D with {channels} channels, which no starter spec covers; "
                "write a spec (medanomaly config show --spec starter_3d is a start)"
            )
        return "starter_3d"
    return "starter_rgb_2d" if channels >= 3 else "starter_2d"


def starter_spec(data: str | Path) -> tuple[str, str]:
    """The starter spec for ``data``: its name and its YAML text, with ``data.path`` set.

    The text is the built-in file's (its comments kept), with a header saying where it came
    from; the level is ``both`` (image and pixel metrics) when the listing names lesion masks.
    """
    cases = list_cases(data)
    dims, channels = data_shape(cases, data)
    name = starter_name(dims, channels)
    text = builtin("spec", name).read_text()
    text = text.replace(PATH_LINE, f"  path: {json.dumps(str(data))}\n", 1)
    if any(case.mask is not None for case in cases):
        text = text.replace(LEVEL_LINE, "level: both   # the data name lesion masks\n", 1)
    log.info("compare: %s holds %dD data with %d channel(s): spec %s", data, dims, channels, name)
    header = (
        f"# {name}: the starter spec medanomaly compare chose for {data} ({dims}D, "
        f"{channels} channel(s)).\n# Edit it, then: medanomaly compare --spec THIS_FILE --out "
        "OUT (the format: docs/compare.md)\n"
    )
    return name, header + text
