"""Building runtimes: today, adding one from an OCI image archive (see README.md)."""

from kiln.build.oci import ImageArchiveError, UnpackLimits, load_image_archive

__all__ = ["ImageArchiveError", "UnpackLimits", "load_image_archive"]
