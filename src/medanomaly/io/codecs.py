"""JPEG decoders that pydicom's own plugins lack under a licence that suits Apache-2.0.

pydicom decodes JPEG Lossless (process 14) and 12-bit JPEG Extended (process 2 and 4) only
through pylibjpeg-libjpeg (GPL-3.0) or python-gdcm, whose wheels refuse 12-bit lossy JPEG.
imagecodecs (BSD-3-Clause) bundles libjpeg-turbo 3, which decodes both; this module is the
small adapter that registers it as a pydicom decoder plugin, following pydicom's plugin
interface (``is_available``, ``DECODER_DEPENDENCIES`` and a per-frame decode function).

JPEG-LS comes from pydicom's own ``pyjpegls`` plugin (MIT, CharLS), JPEG 2000 from
``pylibjpeg-openjpeg`` (MIT), RLE Lossless from pydicom's native decoder.
"""

from __future__ import annotations

import importlib.util

from pydicom import uid
from pydicom.pixels.decoders import (
    JPEGExtended12BitDecoder,
    JPEGLosslessDecoder,
    JPEGLosslessSV1Decoder,
)
from pydicom.pixels.decoders.base import DecodeRunner

PLUGIN_LABEL = "imagecodecs"
"""Name of the plugin in pydicom's decoder lists (and in pydicom's error messages)."""

DECODER_DEPENDENCIES = {
    uid.JPEGExtended12Bit: ("numpy", "imagecodecs"),
    uid.JPEGLossless: ("numpy", "imagecodecs"),
    uid.JPEGLosslessSV1: ("numpy", "imagecodecs"),
}

_DECODERS = (JPEGExtended12BitDecoder, JPEGLosslessDecoder, JPEGLosslessSV1Decoder)


def is_available(syntax: str) -> bool:
    """Tell pydicom whether the plugin can decode ``syntax`` here."""
    return syntax in DECODER_DEPENDENCIES and importlib.util.find_spec("imagecodecs") is not None


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """Decode one JPEG frame with libjpeg-turbo; return the samples as stored (no colour change).

    Args:
        src: The encoded frame.
        runner: pydicom's decoding state (rows, columns, samples, bit depth).

    Returns:
        The decoded samples in the byte order pydicom expects (native, 8 or 16 bits).
    """
    import imagecodecs

    # colorspace=None keeps the samples as encoded; pydicom converts YBR itself when asked
    pixels = imagecodecs.jpeg8_decode(src, colorspace=None, outcolorspace=None)
    runner.set_option("bits_allocated", 8 * pixels.dtype.itemsize)
    if runner.samples_per_pixel > 1:
        runner.set_option("planar_configuration", 0)
    return pixels.tobytes()


def register() -> None:
    """Add the plugin to pydicom's JPEG Extended and JPEG Lossless decoders (once)."""
    for decoder in _DECODERS:
        if PLUGIN_LABEL not in decoder.available_plugins and PLUGIN_LABEL not in getattr(
            decoder, "_unavailable", {}
        ):
            decoder.add_plugin(PLUGIN_LABEL, (__name__, "decode_frame"))
