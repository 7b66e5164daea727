# Over 500 lines: one generator (latent dynamics, unit models, spikes, behaviour, images) read top to bottom.
"""Synthetic recordings with ground-truth firing rates.

Each session is a population of units driven by a few shared latent factors.
The latents are smooth and partly predictable over 0.1 to 2 s, so the last
second of activity says something about the next second, while every session
has its own units, read-out weights and rates.

Generative model (all times in seconds; ``rng = Generator(PCG64(seed))``):

1. Latents ``z(t)`` on a 10 ms grid (``LATENT_DT``), each standardised to zero
   mean and unit variance:

   - a Lorenz system (sigma=10, rho=28, beta=8/3), integrated with 4th-order
     Runge-Kutta at a step of 10 ms of real time, one Lorenz time unit lasting
     0.6 to 1.2 s (chaotic, ~0.5 to 1 s oscillations, predictable over ~1 s);
   - two noisy damped oscillators (complex AR(1), 0.5 to 3 Hz, damping time 2 to
     6 s), real and imaginary parts;
   - a slow drift (Ornstein-Uhlenbeck, time constant 20 to 60 s);
   - multimodal sessions only: two "input" factors, the external 2-D signal
     ``v(t)`` (see 4.) filtered by a causal gamma kernel that peaks 0.2 to 0.4 s
     after the input.

2. Units (20 to 400 per session, uniform, unless ``n_units`` is given): baseline
   rate ``b_u`` log-normal (median 4 Hz, sigma 1 in log space, clipped to
   [0.1, 50] Hz); log-rate modulation ``w_u . z(t)`` with a random direction and a
   depth of 0.3 to 1.0 (std of the log rate), normalised so that the session
   mean of ``b_u exp(w_u . z)`` is ``b_u``; times, in multimodal sessions, image
   responses (3.); then soft-limited, ``r / sqrt(1 + (r / 200 Hz)^2)``. The result
   is the intensity ``r_u(t)`` at the grid nodes, linearly interpolated between
   nodes.

3. Images (multimodal only): a fixed library of 16 images with unit-norm
   32-D embeddings (:func:`image_library`, same for every seed). An image is
   shown every 0.5 to 1.5 s (uniform gaps). 80% of the units respond, like a
   visual area to flashed natural images: unit ``u`` adds
   ``a_uj * alpha((t - onset - latency_u) / rise_u)`` to its log rate, with
   ``alpha(s) = s exp(1 - s)`` for ``s > 0`` (peak 1 at ``s = 1``), latency 40 to
   100 ms, rise 30 to 60 ms (so the response spans ~50 to 300 ms after the
   onset) and an image-specific amplitude ``a_uj = g_u softplus(2 x_uj - 1)``,
   gain ``g_u`` 1 to 2, drive ``x_uj = 0.7 s_j + 0.71 d_uj``: ``s_j`` is the
   image's salience (:func:`image_salience`, the embedding's projection on a
   fixed direction, shared by every unit and session) and ``d_uj`` the
   (standardised) dot product of the unit's preferred direction with the
   embedding. The response is a function of the embedding, so it generalises
   across images, and most of it is shared by the population, so a model that
   has never seen a unit can still expect it to respond to a salient image.

4. Behaviour, 2-D "velocity" at 100 Hz: in plain sessions a random linear
   read-out of the current latents plus 20% noise; in multimodal sessions the
   external input ``v(t)`` itself (smooth, ~0.3 s time scale) plus 10% noise.
   Since ``v`` reaches the neurons only through the delayed input factors,
   behaviour leads neural activity by 0.2 to 0.4 s.

5. Spikes: a time-rescaled stationary renewal process per unit. With
   ``Lambda_u(t) = integral_0^t r_u``, spike times are ``Lambda_u^-1(s_i)`` where
   ``s_i`` is a renewal process with mean inter-event interval 1, started 50
   intervals before ``t = 0`` so it is in equilibrium at the start. The interval
   law sets the ISI shape. Every interval starts with a refractory offset
   ``1.5 b_u tau_u`` (``tau_u`` at the baseline rate, in rescaled time). Regular
   units (~65%): offset + gamma with shape 0.7 to 5 (CV ~0.45 to 1.2). Bursting
   units (~35%): with probability 0.15 to 0.5 a burst interval (offset + gamma
   of shape 4 with mean 2 to 5 ms at the baseline rate), otherwise a long gamma
   interval (shape 1 to 2) that brings the mean back to 1. Finally an absolute
   refractory period ``tau_u`` (1 to 2.5 ms) is enforced in real time: a spike
   closer to its predecessor than ``tau_u`` plus a small random jitter
   (exponential, mean 0.5 ms) is moved to that distance (counts are kept;
   cascades are handled), so no ISI is below ``tau_u``.

Ground truth. ``true_rates[k, u]`` is ``(Lambda_u(t_k + 0.02) - Lambda_u(t_k)) / 0.02``
with ``t_k = 0.02 k``: the mean of the intensity over the bin. For a stationary
renewal process in rescaled time the expected number of events in a rescaled
interval equals its length, so this is exactly the expected spike count of the
bin given the latents and the image events (marginalising over the unit's own
spiking history) divided by the bin size. The real-time refractory step moves a
few percent of spikes by about a millisecond and never changes a unit's count,
so it shifts expected bin counts negligibly. An oracle that predicts ``true_rates``
knows the future latents and stimuli, so its bits/spike is a ceiling that a
causal model approaches but does not reach (apart from the small within-bin
effects of each unit's own refractoriness and bursts).

Determinism: everything is drawn from one ``numpy.random.Generator(PCG64(seed))``
in a fixed order, so a seed gives byte-identical arrays.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from scipy.signal import lfilter
from tqdm.auto import tqdm

from nh_serve.data.session import write_session
from nh_serve.errors import InputError

__all__ = [
    "BIN_SIZE",
    "LATENT_DT",
    "IMAGE_LIBRARY_SEED",
    "image_library",
    "image_salience",
    "make_session",
    "write_synthetic_sessions",
    "make_demo",
    "add_cli",
]

#: Width of the ground-truth rate bins (seconds).
BIN_SIZE = 0.02
#: Grid of the latents, the intensity nodes and the behaviour samples (seconds; 100 Hz).
LATENT_DT = 0.01
#: Seed of the fixed image library shared by all sessions.
IMAGE_LIBRARY_SEED = 20_240_601
N_IMAGES = 16
IMAGE_DIM = 32
#: Fraction of units that respond to images, and the weight of the shared image salience in
#: each unit's image drive (the rest is the unit's own tuning).
RESPONSIVE_FRACTION = 0.8
SALIENCE_WEIGHT = 0.7
#: Soft ceiling of the intensity (Hz).
MAX_RATE = 200.0
#: Demo recording: seed, units, duration.
DEMO_SEED = 7
DEMO_UNITS = 120
DEMO_DURATION = 300.0
#: Units processed together (bounds memory to a few (64, n_nodes) float64 arrays).
_UNIT_CHUNK = 64

# keys of make_session's result that write_session takes
_WRITE_KEYS = (
    "spike_times",
    "unit_index",
    "unit_ids",
    "start",
    "end",
    "units_extra",
    "behavior",
    "image_embeddings",
    "trials",
    "true_rates",
    "provenance",
)


def image_salience(lib: np.ndarray | None = None) -> np.ndarray:
    """Population drive of each image, ``(n_images,)`` ~N(0, 1): the embedding's projection on a
    fixed direction (seeded like the library), times ``sqrt(dim)``. Images with a high salience
    excite most responsive units of every session; a model can read it from the embedding."""
    lib = image_library() if lib is None else lib
    rng = np.random.Generator(np.random.PCG64(IMAGE_LIBRARY_SEED + 1))
    direction = rng.normal(size=lib.shape[1])
    direction /= np.linalg.norm(direction)
    return (lib.astype(np.float64) @ direction) * math.sqrt(lib.shape[1])


def image_library(
    *, n_images: int = N_IMAGES, dim: int = IMAGE_DIM, seed: int = IMAGE_LIBRARY_SEED
) -> np.ndarray:
    """Fixed image embeddings, ``(n_images, dim)`` float32 with unit-norm rows."""
    rng = np.random.Generator(np.random.PCG64(seed))
    e = rng.normal(size=(n_images, dim))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    return e.astype(np.float32)


# --------------------------------------------------------------------------- latents


def _lorenz(n: int, *, h: float, rng: np.random.Generator) -> np.ndarray:
    """Lorenz trajectory, ``(n, 3)``, RK4 with step ``h`` (Lorenz time units), after a burn-in."""
    sigma, rho, beta = 10.0, 28.0, 8.0 / 3.0
    x, y, z = (float(v) for v in rng.normal(0.0, 5.0, size=3) + np.array([0.0, 0.0, 25.0]))
    out = np.empty((n, 3))
    burn = int(round(5.0 / h))
    for i in range(-burn, n):
        k1x, k1y, k1z = sigma * (y - x), x * (rho - z) - y, x * y - beta * z
        ax, ay, az = x + 0.5 * h * k1x, y + 0.5 * h * k1y, z + 0.5 * h * k1z
        k2x, k2y, k2z = sigma * (ay - ax), ax * (rho - az) - ay, ax * ay - beta * az
        ax, ay, az = x + 0.5 * h * k2x, y + 0.5 * h * k2y, z + 0.5 * h * k2z
        k3x, k3y, k3z = sigma * (ay - ax), ax * (rho - az) - ay, ax * ay - beta * az
        ax, ay, az = x + h * k3x, y + h * k3y, z + h * k3z
        k4x, k4y, k4z = sigma * (ay - ax), ax * (rho - az) - ay, ax * ay - beta * az
        x += h / 6.0 * (k1x + 2 * k2x + 2 * k3x + k4x)
        y += h / 6.0 * (k1y + 2 * k2y + 2 * k3y + k4y)
        z += h / 6.0 * (k1z + 2 * k2z + 2 * k3z + k4z)
        if i >= 0:
            out[i] = (x, y, z)
    return out


def _ar1(n: int, *, coef: complex | float, rng: np.random.Generator, complex_: bool = False) -> np.ndarray:
    """Stationary AR(1) ``x[k+1] = coef x[k] + noise`` with unit variance, ``(n,)`` (complex if asked)."""
    scale = math.sqrt(max(1.0 - abs(coef) ** 2, 1e-12))
    burn = int(min(20_000, 10.0 / max(1.0 - abs(coef), 1e-6)))
    if complex_:
        noise = (rng.normal(size=n + burn) + 1j * rng.normal(size=n + burn)) * (scale / math.sqrt(2.0))
    else:
        noise = rng.normal(size=n + burn) * scale
    return lfilter([1.0], [1.0, -coef], noise)[burn:]


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-9)


def _latents(n: int, *, multimodal: bool, rng: np.random.Generator):
    """Latent factors on the LATENT_DT grid.

    Returns ``(z (n, K) float64 standardised, names list[str], input (n, 2) or None, params dict)``.
    """
    dt = LATENT_DT
    lorenz_scale = float(rng.uniform(0.6, 1.2))  # seconds per Lorenz time unit
    lor = _lorenz(n, h=dt / lorenz_scale, rng=rng)
    freqs = np.exp(rng.uniform(np.log(0.5), np.log(3.0), size=2))
    damps = rng.uniform(2.0, 6.0, size=2)
    oscs = []
    for f, d in zip(freqs, damps):
        c = _ar1(n, coef=complex(np.exp((-1.0 / d + 2j * np.pi * f) * dt)), rng=rng, complex_=True)
        oscs += [c.real, c.imag]
    drift_tau = float(rng.uniform(20.0, 60.0))
    drift = _ar1(n, coef=math.exp(-dt / drift_tau), rng=rng)
    cols = [lor, np.stack(oscs, axis=1), drift[:, None]]
    names = ["lorenz_x", "lorenz_y", "lorenz_z", "osc1_re", "osc1_im", "osc2_re", "osc2_im", "drift"]
    params = {
        "lorenz_seconds_per_unit": lorenz_scale,
        "osc_freq_hz": freqs.tolist(),
        "osc_damping_s": damps.tolist(),
        "drift_tau_s": drift_tau,
    }
    v = None
    if multimodal:
        # external input: twice-smoothed OU noise, time scale ~0.3 s
        tau_v = float(rng.uniform(0.2, 0.4))
        a = math.exp(-dt / tau_v)
        v = np.stack([_ar1(n, coef=a, rng=rng) for _ in range(2)], axis=1)
        v = lfilter([1.0 - a], [1.0, -a], v, axis=0)
        v = _standardise(v)
        delay = float(rng.uniform(0.2, 0.4))  # peak of the causal input kernel
        theta = delay / 2.0
        lag = np.arange(int(round(6 * delay / dt)) + 1) * dt
        kern = lag**2 * np.exp(-lag / theta)
        kern /= kern.sum()
        drive = lfilter(kern, [1.0], v, axis=0)
        cols.append(drive)
        names += ["input_1", "input_2"]
        params.update({"input_tau_s": tau_v, "input_delay_s": delay})
    z = _standardise(np.concatenate(cols, axis=1))
    return z, names, v, params


# --------------------------------------------------------------------------- spikes


def _renewal_isis(n: int, unit: dict, rng: np.random.Generator) -> np.ndarray:
    """``n`` renewal intervals in rescaled time (mean 1) for one unit."""
    if unit["burst_prob"] > 0:
        p, off, mg = unit["burst_prob"], unit["offset"], unit["burst_gamma"]
        short = off + rng.gamma(4.0, mg / 4.0, size=n)
        ml = (1.0 - p * (off + mg)) / (1.0 - p)
        k = unit["isi_shape"]
        long_ = rng.gamma(k, ml / k, size=n)
        return np.where(rng.random(n) < p, short, long_)
    k, off = unit["isi_shape"], unit["offset"]
    return off + rng.gamma(k, (1.0 - off) / k, size=n)


def _unit_spikes(
    lam: np.ndarray, r: np.ndarray, unit: dict, *, duration: float, rng: np.random.Generator
) -> np.ndarray:
    """Spike times (sorted, seconds) of one unit from its intensity ``r`` (n_nodes,) and integral ``lam``."""
    dt = LATENT_DT
    total = float(lam[-1])
    warm = 50.0
    need = total + warm
    n = int(need + 8.0 * math.sqrt(need) * 3.0 + 64)
    isi = _renewal_isis(n, unit, rng)
    s = np.cumsum(isi)
    while s[-1] < need:
        more = np.cumsum(_renewal_isis(n, unit, rng)) + s[-1]
        s = np.concatenate([s, more])
    s = s - warm
    s = s[(s >= 0.0) & (s < total)]
    seg = np.searchsorted(lam, s, side="right") - 1
    seg = np.clip(seg, 0, lam.shape[0] - 2)
    c = s - lam[seg]
    r0, r1 = r[seg], r[seg + 1]
    a2 = (r1 - r0) / (2.0 * dt)
    disc = np.maximum(r0 * r0 + 4.0 * a2 * c, 0.0)
    t = seg * dt + 2.0 * c / (r0 + np.sqrt(disc))
    # absolute refractory period in real time: t'_i = max(t_i, t'_{i-1} + d_i) with
    # d_i = tau + Exp(0.5 ms) (a jittered dead time, so moved spikes do not pile up at tau);
    # with D_i = cumsum(d), t'_i - D_i = max(t_i - D_i, t'_{i-1} - D_{i-1}) is a running max.
    dead = np.cumsum(unit["refractory"] + rng.exponential(0.0005, size=t.shape[0]))
    t = np.maximum.accumulate(t - dead) + dead
    return t[t < duration]


# --------------------------------------------------------------------------- session


def _check_args(*, duration, n_units) -> float:
    """Validate duration / n_units; returns the duration rounded down to whole bins (seconds)."""
    try:
        duration = float(duration)
    except (TypeError, ValueError):
        raise InputError(f"duration (--duration): must be a number of seconds, got {duration!r}") from None
    if not math.isfinite(duration) or duration < 1.0:
        raise InputError(f"duration (--duration): must be at least 1 s, got {duration}")
    if n_units is not None and (int(n_units) != n_units or not 1 <= int(n_units) <= 5000):
        raise InputError(f"n_units (--units): must be an integer between 1 and 5000, got {n_units}")
    return math.floor(duration / BIN_SIZE + 1e-9) * BIN_SIZE


def make_session(
    *,
    seed,
    n_units: int | None = None,
    duration: float = 600.0,
    multimodal: bool = False,
    session_id: str = "synth",
) -> dict:
    """Generate one synthetic recording.

    Args:
        seed: int (or sequence of ints) for ``Generator(PCG64(seed))``.
        n_units: number of units; default drawn uniformly from 20..400.
        duration: seconds, rounded down to a multiple of ``BIN_SIZE`` (at least 1 s).
        multimodal: add image presentations with stimulus-specific responses, and
            behaviour that leads the neural activity.
        session_id: name stored in the provenance and used in the unit ids.

    Returns a dict with the :func:`~nh_serve.data.session.write_session` arguments
    (``spike_times`` (N,) s, ``unit_index`` (N,), ``unit_ids`` (U,), ``start``, ``end``,
    ``units_extra``, ``behavior`` = (times (T_b,), values (T_b, 2)), ``image_embeddings``
    = (onsets (E,), embeddings (E, 32)) or None, ``trials`` or None, ``true_rates`` =
    (rates (T, U) float32 Hz, 0.02), ``provenance``) plus ground truth for analysis:
    ``latents`` (T_b, K) float32 on the behaviour times, ``latent_names``,
    ``image_index`` (E,) int64 or None, ``input`` (T_b, 2) float32 or None (the
    external input of multimodal sessions).
    """
    duration = _check_args(duration=duration, n_units=n_units)
    if seed is None or isinstance(seed, (float, str)):
        raise InputError(f"seed: pass an integer (or a list of integers), got {seed!r}")
    n_bins = int(round(duration / BIN_SIZE))
    rng = np.random.Generator(np.random.PCG64(seed))
    U = int(rng.integers(20, 401)) if n_units is None else int(n_units)
    steps_per_bin = int(round(BIN_SIZE / LATENT_DT))
    n_nodes = n_bins * steps_per_bin + 1
    t_nodes = np.arange(n_nodes) * LATENT_DT

    z, names, v, lat_params = _latents(n_nodes, multimodal=multimodal, rng=rng)
    K = z.shape[1]

    # --- unit parameters
    base = np.clip(np.exp(rng.normal(np.log(4.0), 1.0, size=U)), 0.1, 50.0)
    depth = rng.uniform(0.3, 1.0, size=U)
    w = rng.normal(size=(U, K))
    group_scale = np.ones(K)
    group_scale[names.index("drift")] = 0.5
    w *= group_scale
    if multimodal:
        # the first input factor raises the rate of every unit (like locomotion in visual cortex)
        w[:, names.index("input_1")] = np.abs(w[:, names.index("input_1")])
    w *= (depth / np.linalg.norm(w, axis=1))[:, None]
    refractory = rng.uniform(0.001, 0.0025, size=U)
    bursting = rng.random(U) < 0.35
    isi_shape = np.where(
        bursting, rng.uniform(1.0, 2.0, size=U), np.exp(rng.uniform(np.log(0.7), np.log(5.0), size=U))
    )
    burst_prob = np.where(bursting, rng.uniform(0.15, 0.5, size=U), 0.0)
    burst_gap = rng.uniform(0.002, 0.005, size=U)  # mean burst ISI beyond the offset, at baseline (s)
    offset = np.minimum(base * refractory * 1.5, 0.5)  # rescaled-time refractory offset

    # --- image presentations and response parameters
    image_times = image_idx = image_emb = None
    gain = np.zeros(U)
    latency = np.zeros(U)
    rise = np.ones(U)
    amp = None
    if multimodal:
        lib = image_library()
        gaps = rng.uniform(0.5, 1.5, size=int(duration / 0.5) + 2)
        onsets = rng.uniform(0.2, 1.0) + np.concatenate([[0.0], np.cumsum(gaps)])
        image_times = onsets[onsets < duration - 0.3]
        image_idx = rng.integers(0, N_IMAGES, size=image_times.shape[0]).astype(np.int64)
        image_emb = lib[image_idx]
        responsive = rng.random(U) < RESPONSIVE_FRACTION
        gain = np.where(responsive, rng.uniform(1.0, 2.0, size=U), 0.0)
        latency = rng.uniform(0.04, 0.1, size=U)
        rise = rng.uniform(0.03, 0.06, size=U)
        pref = rng.normal(size=(U, IMAGE_DIM))
        pref /= np.linalg.norm(pref, axis=1, keepdims=True)
        d = (pref @ lib.T) * math.sqrt(IMAGE_DIM)  # (U, N_IMAGES), ~N(0, 1): unit-specific tuning
        sal = image_salience(lib)  # (N_IMAGES,), ~N(0, 1): shared by all units of all sessions
        drive = SALIENCE_WEIGHT * sal[None, :] + math.sqrt(1.0 - SALIENCE_WEIGHT**2) * d  # (U, N_IMAGES)
        amp = gain[:, None] * np.logaddexp(0.0, 2.0 * drive - 1.0)  # (U, N_IMAGES) log-rate amplitude

    # --- intensity, its integral, true rates and spikes, in chunks of units
    true_rates = np.empty((n_bins, U), dtype=np.float32)
    times, units = [], []
    n_win = int(round(0.8 / LATENT_DT))
    win = np.arange(n_win + 1) * LATENT_DT
    zt = np.ascontiguousarray(z.T)  # (K, n_nodes)
    chunks = range(0, U, _UNIT_CHUNK)
    quiet = U * n_nodes < 50_000_000  # only long, large sessions take more than a few seconds
    for c0 in tqdm(chunks, desc=f"{session_id} units", unit="chunk", disable=quiet, leave=False):
        c1 = min(U, c0 + _UNIT_CHUNK)
        rates = np.exp(w[c0:c1] @ zt)  # (C, n_nodes)
        rates *= (base[c0:c1] / rates.mean(axis=1))[:, None]  # session mean of the latent part = baseline
        if amp is not None:
            lat, ris = latency[c0:c1, None], rise[c0:c1, None]
            for t_on, j in zip(image_times, image_idx):
                n0 = int(math.ceil(t_on / LATENT_DT - 1e-9))
                n1 = min(n_nodes, n0 + n_win + 1)
                rel = n0 * LATENT_DT + win[None, : n1 - n0] - t_on  # (1, L) s since onset
                sarg = np.maximum((rel - lat) / ris, 0.0)  # (C, L)
                rates[:, n0:n1] *= np.exp(amp[c0:c1, j, None] * sarg * np.exp(1.0 - sarg))
        # soft ceiling: r / sqrt(1 + (r / MAX_RATE)^2) stays below MAX_RATE; linear between nodes
        rates /= np.sqrt(1.0 + (rates * (1.0 / MAX_RATE)) ** 2)
        lam = np.zeros_like(rates)  # (C, n_nodes) expected counts since t = 0
        np.cumsum((rates[:, 1:] + rates[:, :-1]) * (0.5 * LATENT_DT), axis=1, out=lam[:, 1:])
        true_rates[:, c0:c1] = (
            (lam[:, steps_per_bin::steps_per_bin] - lam[:, :-1:steps_per_bin]) / BIN_SIZE
        ).T
        for k, u in enumerate(range(c0, c1)):
            unit = {
                "burst_prob": float(burst_prob[u]),
                "burst_gamma": float(base[u] * burst_gap[u]),
                "isi_shape": float(isi_shape[u]),
                "offset": float(offset[u]),
                "refractory": float(refractory[u]),
            }
            t = _unit_spikes(lam[k], rates[k], unit, duration=duration, rng=rng)
            times.append(t)
            units.append(np.full(t.shape[0], u, dtype=np.int64))
    spike_times = np.concatenate(times)
    unit_index = np.concatenate(units)
    order = np.argsort(spike_times, kind="stable")
    spike_times, unit_index = spike_times[order], unit_index[order]

    # --- behaviour (2-D, 100 Hz, at the node times except the last)
    bt = t_nodes[:-1]
    if multimodal:
        beh = v[:-1] + 0.1 * rng.normal(size=(n_nodes - 1, 2))
    else:
        bw = rng.normal(size=(2, K))
        sig = z[:-1] @ bw.T
        sig /= sig.std(axis=0)
        beh = sig + 0.2 * rng.normal(size=sig.shape)
    behavior = (bt, beh.astype(np.float32))

    unit_ids = np.array([f"{session_id}_u{u:03d}" for u in range(U)])
    units_extra = {
        "true_baseline_rate_hz": base,
        "true_refractory_s": refractory,
        "true_isi_shape": isi_shape,
        "true_burst_prob": burst_prob,
        "true_modulation_depth": depth,
        "true_image_gain": gain,
        "true_image_latency_s": latency,
    }
    trials = None
    if multimodal:
        trials = {"start": image_times, "end": image_times + 0.25, "image_index": image_idx}
    provenance = {
        "source": "nh_serve.data.synth",
        "session_id": session_id,
        "seed": np.asarray(seed).tolist() if np.asarray(seed).dtype.kind in "iu" else str(seed),
        "multimodal": bool(multimodal),
        "duration_s": duration,
        "n_units": U,
        "latents": names,
        "latent_params": lat_params,
        "image_library_seed": IMAGE_LIBRARY_SEED if multimodal else None,
        "true_rates": "mean intensity over each 20 ms bin = expected spike count given the latents / 0.02 s",
    }
    return {
        "spike_times": spike_times,
        "unit_index": unit_index,
        "unit_ids": unit_ids,
        "start": 0.0,
        "end": duration,
        "units_extra": units_extra,
        "behavior": behavior,
        "image_embeddings": None if image_times is None else (image_times, image_emb),
        "trials": trials,
        "true_rates": (true_rates, BIN_SIZE),
        "provenance": provenance,
        "latents": z[:-1].astype(np.float32),
        "latent_names": names,
        "image_index": image_idx,
        "input": None if v is None else v[:-1].astype(np.float32),
    }


def write_synthetic_sessions(
    out_dir,
    *,
    n_sessions: int,
    seed: int = 0,
    duration: float = 600.0,
    multimodal: bool = False,
    n_units: int | None = None,
    prefix: str = "synth",
) -> list[Path]:
    """Write ``n_sessions`` recordings ``<prefix>_000.h5``, ... into ``out_dir`` (created if needed).

    Session ``i`` uses ``Generator(PCG64([seed, i]))``, so sessions differ from
    each other and the set is reproducible from ``seed``. Returns the paths.
    """
    if int(n_sessions) != n_sessions or int(n_sessions) < 1:
        raise InputError(f"sessions (--sessions): must be a positive integer, got {n_sessions}")
    _check_args(duration=duration, n_units=n_units)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"out: cannot create folder {out} ({e}); pass a writable folder") from None
    paths = []
    for i in tqdm(range(int(n_sessions)), desc="synthetic sessions", unit="session"):
        sid = f"{prefix}_{i:03d}"
        d = make_session(
            seed=[int(seed), i], n_units=n_units, duration=duration, multimodal=multimodal, session_id=sid
        )
        d["provenance"]["session_index"] = i
        paths.append(write_session(out / f"{sid}.h5", **{k: d[k] for k in _WRITE_KEYS}))
    return paths


def make_demo(out_dir) -> Path:
    """Write the small demo recording ``demo.h5`` (120 units, 5 min, multimodal) into ``out_dir``."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"out: cannot create folder {out} ({e}); pass a writable folder") from None
    d = make_session(
        seed=DEMO_SEED, n_units=DEMO_UNITS, duration=DEMO_DURATION, multimodal=True, session_id="demo"
    )
    return write_session(out / "demo.h5", **{k: d[k] for k in _WRITE_KEYS})


# --------------------------------------------------------------------------- command line


def _run(args: argparse.Namespace) -> int:
    if args.demo:
        path = make_demo(args.out)
        print(f"wrote {path}")
        return 0
    paths = write_synthetic_sessions(
        args.out,
        n_sessions=args.sessions,
        seed=args.seed,
        duration=args.duration,
        multimodal=args.multimodal,
        n_units=args.units,
    )
    print(f"wrote {len(paths)} session(s) to {Path(args.out)}")
    return 0


def add_cli(subparsers) -> None:
    """Register ``nh-serve synth``."""
    p = subparsers.add_parser(
        "synth",
        help="write synthetic recordings with ground-truth rates",
        description="Write synthetic recordings (session files with true_rates) for testing and benchmarks.",
    )
    p.add_argument("--out", required=True, help="output folder (created if needed)")
    p.add_argument("--sessions", type=int, default=10, help="number of sessions (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds per session (default 600)")
    p.add_argument("--units", type=int, default=None, help="units per session (default: random 20..400)")
    p.add_argument("--multimodal", action="store_true", help="add image presentations and leading behaviour")
    p.add_argument(
        "--demo", action="store_true", help="write only the demo recording demo.h5 (120 units, 5 min)"
    )
    p.set_defaults(func=_run)
