"""The ``kiln builder`` service: the build queue, build workers, base images (see README)."""
