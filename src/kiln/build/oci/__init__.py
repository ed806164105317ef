"""OCI image archives: reading (archive), safe layer unpacking (unpack), the cache (cache)."""

from kiln.build.oci.archive import ImageArchiveError, Progress
from kiln.build.oci.cache import load_image_archive, rootfs_path
from kiln.build.oci.unpack import UnpackLimits

__all__ = ["ImageArchiveError", "Progress", "UnpackLimits", "load_image_archive", "rootfs_path"]
