"""Readers that turn spike-sorted recordings into nh-serve session files.

One module per source format, each returning a :class:`~nh_serve.ingest.common.Recording`
that :func:`~nh_serve.ingest.common.write_recording` filters and writes:

* :func:`read_ibl` (``ibl``): an IBL session probe through ONE;
* :func:`read_allen` (``allen``): an Allen Brain Observatory Neuropixels NWB file,
  read with allensdk in its own environment (``.venv-allen``);
* :func:`read_nwb` (``nwb``): any NWB 2 file's units table;
* :func:`read_phy` (``phy``): a Kilosort / phy output folder;
* :func:`read_npz` (``npz``): spike times and unit ids in an ``.npz``.

The command line is ``nh-serve ingest <format> ... --out session.h5``
(:mod:`nh_serve.ingest.cli`); ``docs/ingest.md`` describes every format.
"""

from __future__ import annotations

from nh_serve.ingest.allen import read_allen
from nh_serve.ingest.common import DEFAULT_MIN_RATE, Recording, UnitFilter, write_recording
from nh_serve.ingest.ibl import make_one, read_ibl
from nh_serve.ingest.npz import read_npz
from nh_serve.ingest.nwb import read_nwb
from nh_serve.ingest.phy import read_phy

__all__ = [
    "DEFAULT_MIN_RATE",
    "Recording",
    "UnitFilter",
    "make_one",
    "read_allen",
    "read_ibl",
    "read_npz",
    "read_nwb",
    "read_phy",
    "write_recording",
]
