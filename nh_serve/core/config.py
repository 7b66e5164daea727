"""NeuroHorizon model configurations.

A :class:`ModelConfig` fixes every size and time constant of a model; it is
frozen, validated on construction (:mod:`nh_serve.settings`, like every settings
class) and travels inside checkpoints as JSON (:meth:`ModelConfig.to_dict` /
:meth:`ModelConfig.from_dict`).

Time constants are in seconds. The model reads a context of ``context_s``
seconds of spikes and predicts ``n_bins`` bins of ``bin_size_s`` seconds that
start at the context end (default: 1 s of context, 50 x 20 ms bins).

Registered configurations (:data:`CONFIGS`, :func:`get_config`):

``nh-tiny``
    A few thousand parameters, for tests: a forward pass on a handful of units
    takes milliseconds.
``nh-small``
    The default served model, sized for the product latency target (a forward
    pass for 100 units with a 1 s context in a few ms on 2 CPU cores).
``nh-base``
    A larger model for GPU serving and batch scoring.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from nh_serve.data.coupling import N_COUPLINGS, N_STATS
from nh_serve.data.history import HISTORY_TAUS, SLOW_TAU
from nh_serve.settings import Settings, settings

UNIT_EMBEDDING_MODES = ("idencoder", "random", "mean")

# The longest horizon (n_bins * bin_size_s) and context a config may ask for, seconds.
MAX_HORIZON_S = 10.0
MAX_CONTEXT_S = 10.0


@settings(where="model config")
class ModelConfig(Settings):
    """Sizes and time constants of a NeuroHorizon model (times in seconds).

    Attributes:
        name: Label of the configuration (informational; kept in checkpoints).
        dim: Width of every token (spike, latent, bin) and of unit embeddings.
        depth: Number of processor self-attention blocks over the latents.
        heads: Attention heads of the processor and decoder self-attention.
        dim_head: Width of one attention head (all attention layers). 0 means
            ``dim // heads``. Must be a multiple of 4: the first half of every
            head (``rotate_dim = dim_head // 2``, an even number) is rotated.
        cross_heads: Attention heads of the encoder, decoder and multimodal
            cross-attention.
        latent_step: Spacing of the latent grid over the context, seconds.
        n_latents_per_step: Learned latents repeated at each grid time, so the
            model has ``n_latents = n_latents_per_step * context_s / latent_step``.
        context_s: Length of the spike context, seconds.
        bin_size_s: Width of one predicted bin, seconds.
        n_bins: Number of predicted bins after the context end.
        ffn_mult: Hidden width multiplier of the GEGLU feed-forward blocks.
        dropout: Dropout probability (feed-forward and residual branches; training only).
        n_features: Width of the per-unit reference feature vector (33).
        unit_embedding_mode: ``idencoder`` (MLP, default), ``random`` (fixed random
            projection, not trainable) or ``mean`` (one linear layer).
        head_hidden: Hidden width of the per-neuron head.
        head_layers: Linear layers in the per-neuron head (>= 2): the split first
            layer, ``head_layers - 2`` hidden layers, and the output layer.
        activity_scales: Per-unit recent-activity windows, seconds, ascending, each
            in ``(0, context_s]``: the head sees the unit's rate in the last
            ``s`` seconds of the context for each ``s``.
        history_s: Length of the slower history window before the context, seconds.
        behavior_dim: Width of behaviour samples (0 = the model takes no behaviour).
        image_dim: Width of image-embedding events (0 = the model takes no images).
        multimodal_every: Insert a multimodal cross-attention before processor
            block ``i`` for every ``i % multimodal_every == 0`` (only when
            ``behavior_dim`` or ``image_dim`` is non-zero).
        t_min: Shortest rotary period, seconds.
        t_max: Longest rotary period, seconds (keep it above
            ``context_s + n_bins * bin_size_s`` so relative times do not alias).
        baseline_offset: Add the log of a shrunk recent-rate estimate to the head
            output, so the network learns a residual around a persistence
            baseline (see :func:`nh_serve.core.model.baseline_rate_hz`).
        baseline_prior_s: Pseudo-observation time (seconds) of the slow history rate
            when shrinking the recent rate toward it.
        head_activity: Give the per-neuron head each unit's activity (recent counts,
            history and reference rates). ``False`` is an ablation: the head sees
            the unit embedding only (train it with ``baseline_offset=False`` too).
        history_taus: Time constants (seconds) of each unit's smoothed-rate history
            (:mod:`nh_serve.data.history`), the model's per-unit history input; must
            include 30 s (the slow rate every history feature is measured against).
            Empty (the default of older checkpoints): the history is a 30 s spike count.
            Non-empty: the offset is ``log(r_30s + 0.1 Hz)`` and the head holds a
            univariate Poisson GLM term per bin on the unit's relative log rates (the
            ``univariate_glm`` baseline as a special case, which the model starts from).
        uni_path: The per-unit forecaster path (history models only): the GLM term and
            the history features in the head. ``False`` is an ablation.
        pop_path: The population path: the decoded bins reach the head (and, with
            ``readout_dim``, the read-out term). ``False`` is an ablation: every unit is
            forecast from its own history alone.
        readout_dim: Width ``K`` of the population read-out (history models only):
            ``log_rate[u, k] += (B e_u + r_u) . P_k + r_u0`` with ``P = Linear(bins)``
            ``(T, K)``, the zero-shot read-out ``B e_u`` from the unit embedding and a
            per-unit correction ``r_u`` (``unit_readout``, zero unless the Predictor fitted
            it on the reference window, ``register(fit="reference")``). 0 = none.
        pop_context_bins: History models with population tokens: also one token per bin of the
            context split into this many equal bins (the population's activity over the last
            second, each unit's count in the bin weighted by a vector of its embedding), and the
            read-out's population forecast gets a direct path from all the population tokens
            (an MLP), beside the decoded bins. 0 = none.
        pop_tokens: Give the processor one token per history time scale summarising the
            population's relative log rates, each unit weighted by a vector of its
            embedding (history models only).
        coupling_components: Reference-window principal components of the population
            whose loadings describe each unit beside its 33 statistics (plus three
            correlations with the population rate): ``n_features`` must be 33, or
            ``33 + coupling_components + 3``.
    """

    name: str = "custom"
    dim: int = 128
    depth: int = 2
    heads: int = 4
    dim_head: int = 0
    cross_heads: int = 2
    latent_step: float = 0.125
    n_latents_per_step: int = 4
    context_s: float = 1.0
    bin_size_s: float = 0.02
    n_bins: int = 50
    ffn_mult: int = 2
    dropout: float = 0.0
    n_features: int = 33
    unit_embedding_mode: str = "idencoder"
    head_hidden: int = 64
    head_layers: int = 2
    activity_scales: tuple[float, ...] = field(default=(0.05, 0.25, 1.0))
    history_s: float = 30.0
    behavior_dim: int = 0
    image_dim: int = 0
    multimodal_every: int = 1
    t_min: float = 1e-3
    t_max: float = 4.0
    baseline_offset: bool = True
    baseline_prior_s: float = 2.0
    head_activity: bool = True
    history_taus: tuple[float, ...] = ()
    uni_path: bool = True
    pop_path: bool = True
    readout_dim: int = 0
    pop_tokens: bool = False
    pop_context_bins: int = 0
    coupling_components: int = 0

    def __post_init__(self) -> None:
        fail = self.fail
        if self.dim_head == 0:
            if self.heads >= 1 and self.dim % self.heads != 0:
                fail(
                    "dim",
                    f"({self.dim}) must be divisible by heads ({self.heads}) when dim_head is 0 (derived as "
                    "dim // heads); change dim or heads, or set dim_head explicitly",
                )
            object.__setattr__(self, "dim_head", self.dim // max(self.heads, 1))
        for key in (
            "dim",
            "depth",
            "heads",
            "cross_heads",
            "n_latents_per_step",
            "n_bins",
            "ffn_mult",
            "n_features",
            "head_hidden",
        ):
            if getattr(self, key) < 1:
                fail(key, f"must be >= 1, got {getattr(self, key)}")
        if self.dim_head % 4 != 0:
            fail(
                "dim_head",
                f"({self.dim_head}) must be a multiple of 4 so that the rotated half "
                f"(dim_head // 2 = {self.dim_head // 2}) has an even width",
            )
        if self.head_layers < 2:
            fail("head_layers", f"must be >= 2 (split first layer + output layer), got {self.head_layers}")
        for key in ("behavior_dim", "image_dim"):
            if getattr(self, key) < 0:
                fail(key, f"must be >= 0 (0 = no such input), got {getattr(self, key)}")
        if self.is_multimodal and not 1 <= self.multimodal_every <= self.depth:
            fail("multimodal_every", f"({self.multimodal_every}) must be between 1 and depth ({self.depth})")
        for key in ("latent_step", "context_s", "bin_size_s", "history_s", "t_min", "t_max"):
            if not getattr(self, key) > 0:
                fail(key, f"must be a positive number of seconds, got {getattr(self, key)}")
        if self.context_s > MAX_CONTEXT_S:
            fail("context_s", f"({self.context_s} s) is longer than the {MAX_CONTEXT_S} s supported")
        n_steps = self.context_s / self.latent_step
        if abs(n_steps - round(n_steps)) > 1e-6 or round(n_steps) < 1:
            fail("context_s", f"({self.context_s}) must be a whole multiple of latent_step ({self.latent_step})")
        if self.horizon_s > MAX_HORIZON_S:
            fail(
                "n_bins",
                f"* bin_size_s = {self.n_bins} x {self.bin_size_s} = {self.horizon_s:g} s is longer than the "
                f"{MAX_HORIZON_S} s horizon supported; use fewer or shorter bins",
            )
        if self.bin_size_s < 1e-3:
            fail("bin_size_s", f"({self.bin_size_s} s) must be at least 1 ms")
        if not self.t_min < self.t_max:
            fail("t_min", f"({self.t_min}) must be smaller than t_max ({self.t_max})")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.unit_embedding_mode not in UNIT_EMBEDDING_MODES:
            fail(
                "unit_embedding_mode",
                f"{self.unit_embedding_mode!r} is not one of {', '.join(UNIT_EMBEDDING_MODES)}",
            )
        scales = self.activity_scales
        if len(scales) == 0:
            fail("activity_scales", "must list at least one window length in seconds")
        if any(not 0 < s <= self.context_s for s in scales):
            fail("activity_scales", f"{scales} must each be in (0, context_s = {self.context_s}] seconds")
        if any(b <= a for a, b in zip(scales, scales[1:])):
            fail("activity_scales", f"{scales} must be strictly ascending")
        if not self.baseline_prior_s >= 0:
            fail("baseline_prior_s", f"must be >= 0 seconds, got {self.baseline_prior_s}")
        taus = self.history_taus
        if taus:
            if any(not 0 < t <= 3600 for t in taus) or any(b <= a for a, b in zip(taus, taus[1:])):
                fail("history_taus", f"{taus} must be ascending time constants in (0, 3600] seconds")
            if SLOW_TAU not in taus:
                fail("history_taus", f"{taus} must include the slow rate's {SLOW_TAU:g} s")
        elif self.readout_dim or self.pop_tokens or not self.uni_path:
            fail("history_taus", "must list time constants when readout_dim, pop_tokens or uni_path=False are set")
        if self.pop_context_bins and not self.pop_tokens:
            fail("pop_context_bins", "needs pop_tokens=True")
        if not 0 <= self.pop_context_bins <= 100:
            fail("pop_context_bins", f"must be in [0, 100], got {self.pop_context_bins}")
        if not 0 <= self.readout_dim <= 256:
            fail("readout_dim", f"must be in [0, 256], got {self.readout_dim}")
        if not 0 <= self.coupling_components <= 64:
            fail("coupling_components", f"must be in [0, 64], got {self.coupling_components}")
        want = N_STATS + (self.coupling_components + N_COUPLINGS if self.coupling_components else 0)
        if self.n_features != want:
            fail(
                "n_features",
                f"must be {want} (33 reference statistics"
                + (f" + {self.coupling_components} loadings + {N_COUPLINGS} correlations" if self.coupling_components else "")
                + f"), got {self.n_features}",
            )

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def rotate_dim(self) -> int:
        """Rotated width of each attention head (the first half)."""
        return self.dim_head // 2

    @property
    def n_latent_steps(self) -> int:
        """Number of latent grid times over the context."""
        return int(round(self.context_s / self.latent_step))

    @property
    def n_latents(self) -> int:
        """Total latent tokens: ``n_latents_per_step * n_latent_steps``."""
        return self.n_latents_per_step * self.n_latent_steps

    @property
    def horizon_s(self) -> float:
        """Predicted horizon, seconds: ``n_bins * bin_size_s``."""
        return self.n_bins * self.bin_size_s

    @property
    def n_activity(self) -> int:
        """Per-unit activity features the head sees: one per scale + history rate(s) + reference rate."""
        return len(self.activity_scales) + 1 + max(1, len(self.history_taus))

    @property
    def has_history(self) -> bool:
        """Whether the model takes smoothed-rate histories (``history_rates``) instead of a 30 s count."""
        return len(self.history_taus) > 0

    @property
    def is_multimodal(self) -> bool:
        """Whether the model takes behaviour and/or image-embedding inputs."""
        return self.behavior_dim > 0 or self.image_dim > 0


CONFIGS: dict[str, ModelConfig] = {
    "nh-tiny": ModelConfig(
        name="nh-tiny",
        dim=32,
        depth=1,
        heads=2,
        dim_head=16,
        cross_heads=1,
        latent_step=0.25,
        n_latents_per_step=2,
        ffn_mult=2,
        head_hidden=16,
        head_layers=2,
        history_taus=HISTORY_TAUS,
        readout_dim=4,
        pop_tokens=True,
        pop_context_bins=5,
        coupling_components=4,
        n_features=N_STATS + 4 + N_COUPLINGS,
    ),
    "nh-small": ModelConfig(
        name="nh-small",
        dim=128,
        depth=2,
        heads=4,
        dim_head=32,
        cross_heads=2,
        latent_step=0.125,
        n_latents_per_step=4,
        ffn_mult=2,
        head_hidden=64,
        head_layers=2,
        history_taus=HISTORY_TAUS,
        readout_dim=16,
        pop_tokens=True,
        pop_context_bins=10,
        coupling_components=8,
        n_features=N_STATS + 8 + N_COUPLINGS,
    ),
    "nh-base": ModelConfig(
        name="nh-base",
        dim=256,
        depth=6,
        heads=8,
        dim_head=32,
        cross_heads=4,
        latent_step=0.125,
        n_latents_per_step=8,
        ffn_mult=4,
        head_hidden=128,
        head_layers=3,
        dropout=0.1,
        history_taus=HISTORY_TAUS,
        readout_dim=32,
        pop_tokens=True,
        pop_context_bins=10,
        coupling_components=16,
        n_features=N_STATS + 16 + N_COUPLINGS,
    ),
}


#: Overrides that give a registered size the architecture of models without history inputs
#: (a 30 s history count, the persistence offset, no read-out, the 33 statistics only): how the
#: checkpoints of nh-serve 0.1 were built (their stored configs lack these keys, so they load so).
COUNT_HISTORY = {
    "history_taus": (), "readout_dim": 0, "pop_tokens": False, "pop_context_bins": 0, "coupling_components": 0,
    "n_features": N_STATS,
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """Return the registered config ``name`` with ``overrides`` applied (validated).

    ``name`` is kept as given; the overrides are visible in :meth:`ModelConfig.to_dict`.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[name].replace(**overrides) if overrides else CONFIGS[name]
