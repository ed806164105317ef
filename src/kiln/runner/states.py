"""Moved to :mod:`kiln.scheduling.states`. Only ``kiln.storage.handover`` still imports this
name (that module is being reworked on main); point it at ``kiln.scheduling.states`` and
delete this file when the two meet."""

from kiln.scheduling.states import LIVE_STATES

__all__ = ["LIVE_STATES"]
