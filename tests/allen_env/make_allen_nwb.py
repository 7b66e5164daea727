"""Write a small Allen Brain Observatory (Visual Coding Neuropixels) NWB file.

Runs inside ``.venv-allen`` (allensdk 2.16.2) and builds the file with
allensdk's own writer classes, so the result has exactly the layout that
``EcephysSession.from_nwb_path`` reads: one probe with channels in the
brain, a units table with the Allen quality metrics and ragged spike times,
running speed, and stimulus presentations.

Usage::

    .venv-allen/bin/python tests/allen_env/make_allen_nwb.py OUT.nwb EXPECTED.json

``EXPECTED.json`` receives what a reader must find (unit ids kept by the
default Allen filters, spike counts, running speed, presentations) so the
test compares against values written here rather than read back.
"""

from __future__ import annotations

import json
import sys
import warnings
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pynwb
from allensdk.brain_observatory.behavior.data_objects.stimuli.presentations import Presentations
from allensdk.brain_observatory.ecephys._channels import Channels
from allensdk.brain_observatory.ecephys._probe import Probe
from allensdk.brain_observatory.ecephys._unit import Unit
from allensdk.brain_observatory.ecephys._units import Units
from allensdk.brain_observatory.ecephys.probes import Probes
from allensdk.brain_observatory.ecephys.write_nwb.__main__ import add_running_speed_to_nwbfile
from allensdk.brain_observatory.nwb import add_invalid_times, add_stimulus_timestamps

SESSION_ID = 715093703
PROBE_ID = 810755797
DURATION = 20.0  # seconds


def build(out_path: str) -> dict:
    rng = np.random.default_rng(0)
    nwbfile = pynwb.NWBFile(
        session_description="Data and metadata for an Ecephys session",
        identifier=str(SESSION_ID),
        session_id=str(SESSION_ID),
        session_start_time=datetime(2019, 1, 19, 8, 54, 18, tzinfo=timezone.utc),
        institution="Allen Institute",
    )

    # Stimulus presentations: 4 flashes then 6 natural scenes (frame indices).
    starts = np.array([1.0, 2.0, 3.0, 4.0, 6.0, 6.25, 6.5, 6.75, 7.0, 7.25])
    stops = starts + np.array([0.25] * 4 + [0.25] * 6)
    presentations = pd.DataFrame(
        {
            "start_time": starts,
            "stop_time": stops,
            "stimulus_name": ["flashes"] * 4 + ["natural_scenes"] * 6,
            "stimulus_block": [0.0] * 4 + [1.0] * 6,
            "stimulus_index": [1.0] * 4 + [9.0] * 6,
            "frame": [np.nan] * 4 + [5.0, 17.0, 5.0, 3.0, 17.0, 99.0],
            "color": ["1.0", "-1.0", "1.0", "-1.0"] + [""] * 6,
        },
        index=pd.Index(np.arange(10), name="stimulus_presentations_id"),
    )
    nwbfile = add_stimulus_timestamps(nwbfile, presentations["start_time"].values)
    Presentations(presentations=presentations, sort_columns=False).to_nwb(nwbfile=nwbfile)
    nwbfile = add_invalid_times(nwbfile, [])

    # One probe, three channels: two in the brain, one outside it (Allen files
    # store "None" as the location of channels outside the brain).
    channels = [
        {
            "id": 850000000 + i,
            "probe_id": PROBE_ID,
            "valid_data": True,
            "probe_channel_number": i,
            "probe_vertical_position": 20 * i,
            "probe_horizontal_position": 43,
            "anterior_posterior_ccf_coordinate": 8000.0,
            "dorsal_ventral_ccf_coordinate": 3000.0 - 20 * i,
            "left_right_ccf_coordinate": 7000.0,
            "structure_acronym": acr,
            "impedence": np.nan,
            "filtering": "AP band: 500 Hz high-pass; LFP band: 1000 Hz low-pass",
        }
        for i, acr in enumerate(["VISp", "CA1", "None"])
    ]
    # Units: (id, peak channel index, quality, rate Hz).
    spec = [
        (951000001, 0, "good", 12.0),
        (951000002, 1, "good", 3.0),
        (951000003, 0, "noise", 8.0),  # dropped by allensdk (quality)
        (951000004, 2, "good", 5.0),  # dropped by allensdk (outside the brain)
        (951000005, 1, "good", 0.05),  # kept by allensdk, below --min-rate
        (951000006, 0, "good", 7.0),
    ]
    units = []
    expected_counts = {}
    for k, (uid, ch, quality, rate) in enumerate(spec):
        n = max(1, int(rng.poisson(rate * DURATION)))
        times = np.sort(rng.uniform(0.0, DURATION, size=n))
        expected_counts[str(uid)] = int(n)
        units.append(
            Unit(
                id=uid,
                peak_channel_id=channels[ch]["id"],
                local_index=k,
                cluster_id=k,
                quality=quality,
                firing_rate=float(n / DURATION),
                isi_violations=0.1,
                presence_ratio=0.99,
                amplitude_cutoff=0.01,
                snr=3.0 + k,
                mean_waveforms=rng.normal(size=(3, 82)),
                spike_amplitudes=rng.uniform(1e-4, 3e-4, size=n),
                spike_times=times,
            )
        )
    probe = Probe(
        id=PROBE_ID,
        name="probeA",
        channels=Channels.from_json(channels=channels),
        units=Units(units=units),
        sampling_rate=29999.95,
        lfp=None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Probes(probes=[probe]).to_nwb(nwbfile=nwbfile)

    # Running speed in 1 s epochs: velocity = 2 * epoch start (cm/s).
    rs_start = np.arange(0.0, DURATION, 1.0)
    running = pd.DataFrame(
        {
            "start_time": rs_start,
            "end_time": rs_start + 1.0,
            "velocity": 2.0 * rs_start,
            "net_rotation": 0.1 * rs_start,
        }
    )
    add_running_speed_to_nwbfile(nwbfile, running)

    with pynwb.NWBHDF5IO(out_path, mode="w") as io:
        io.write(nwbfile, cache_spec=True)

    kept = [str(uid) for uid, ch, quality, _ in spec if quality == "good" and ch != 2]
    return {
        "session_id": SESSION_ID,
        "probe_id": PROBE_ID,
        "allen_unit_ids": kept,
        "spike_counts": expected_counts,
        "duration": DURATION,
        "running_start": rs_start.tolist(),
        "running_end": (rs_start + 1.0).tolist(),
        "running_velocity": (2.0 * rs_start).tolist(),
        "presentation_starts": starts.tolist(),
        "presentation_stops": stops.tolist(),
        "natural_scene_frames": [5, 17, 5, 3, 17, 99],
    }


if __name__ == "__main__":
    expected = build(sys.argv[1])
    with open(sys.argv[2], "w") as fh:
        json.dump(expected, fh)
