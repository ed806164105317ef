"""Git smart HTTP for project repositories, served by git's own ``git http-backend``."""

from kiln.gitserver.routes import router

__all__ = ["router"]
