"""Session files: one recording in the temporaldata / brainsets HDF5 layout.

A session file is what ``temporaldata.Data(...).to_hdf5(h5py.File(path, "w"))``
writes, with these members (times are seconds on the recording clock):

- ``spikes``: ``IrregularTimeSeries`` with ``timestamps`` (float64, sorted) and
  ``unit_index`` (int64 row into ``units``).
- ``units``: ``ArrayDict`` with ``id`` (string unit ids) and any per-unit columns
  (quality metrics, ground-truth parameters), all of length ``n_units``.
- ``domain``: ``Interval``; the recording extent is ``[min(start), max(end))``.
- optional ``behavior``: ``IrregularTimeSeries`` with ``values`` (N, D_b).
- optional ``image_embeddings``: ``IrregularTimeSeries`` with ``embedding`` (N, D_img),
  one row per stimulus presentation, stamped with its start time.
- optional ``trials``: ``Interval`` with ``start``, ``end`` and more columns.
- optional ``true_rates`` (synthetic recordings): ``RegularTimeSeries`` with
  ``rates`` (T, n_units) float32 in Hz; row ``k`` is the bin
  ``[t_k, t_k + 1 / sampling_rate)`` with ``t_k = domain.start + k / sampling_rate``.
- ``provenance``: a JSON string stored as a file attribute (temporaldata loads
  it back as a plain ``str`` attribute of ``Data``).

How temporaldata 0.1.6 stores it (and what this reader relies on): every group
carries an ``object`` attribute naming its class; string columns are stored as
fixed-length ASCII bytes (``S``) and listed in the group's ``_unicode_keys``
attribute; ``IrregularTimeSeries`` groups also hold a ``timestamp_indices_1s``
dataset and their own ``domain`` group; ``RegularTimeSeries`` keeps
``sampling_rate`` as an attribute. Lazy loading in temporaldata keeps
``h5py.Dataset`` handles and slices them on access, so the datasets are written
uncompressed and contiguous, which also makes our partial reads cheap.

:mod:`~nh_serve.data.session.read` opens and checks a file lazily
(:func:`open_session`); :mod:`~nh_serve.data.session.write` validates a recording and
writes it (:func:`write_session`).
"""

from nh_serve.data.session.read import FULL_CHECK_MAX_SPIKES, Session, open_session
from nh_serve.data.session.write import write_session

__all__ = ["FULL_CHECK_MAX_SPIKES", "Session", "open_session", "write_session"]
