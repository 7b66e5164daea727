"""Session files (HDF5, the temporaldata / brainsets layout): :func:`open_session` reads them
(:mod:`~nh_serve.data.session.read`), :func:`write_session` writes them."""

from nh_serve.data.session.read import FULL_CHECK_MAX_SPIKES, Session, open_session, write_session

__all__ = ["FULL_CHECK_MAX_SPIKES", "Session", "open_session", "write_session"]
