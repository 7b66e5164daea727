"""Which recordings a checkpoint has already seen: scores on them are in-sample, not held-out.

``nh-serve train`` stores every training and validation recording's name and spike
fingerprint (:func:`nh_serve.data.spikes.spikes_fingerprint`) in the checkpoint's
``training["data"]``. :func:`seen_as` matches a scored recording by fingerprint (a renamed
or re-ingested copy of the same spikes is still recognised) and, for checkpoints from
before fingerprints, by its ``<folder>/<file>`` name.
"""

from __future__ import annotations

from nh_serve.data.spikes import spikes_fingerprint


def _seen(checkpoint) -> dict[str, list[dict]]:
    data = ((getattr(checkpoint, "training", None) or {}).get("data") or {})
    return {role: list(data.get(role) or []) for role in ("train", "val")}


def seen_as(checkpoint, *, times, units, name: str) -> str | None:
    """``"training"`` or ``"validation"`` if ``checkpoint`` was trained or validated on these spikes
    (or, failing fingerprints, on a recording of this ``<folder>/<file>`` name), else None."""
    seen = _seen(checkpoint)
    if not any(seen.values()):
        return None
    fp = spikes_fingerprint(times, units)
    for role, label in (("train", "training"), ("val", "validation")):
        for rec in seen[role]:
            if rec.get("spikes_sha256") == fp or (not rec.get("spikes_sha256") and rec.get("name") == name):
                return label
    return None
