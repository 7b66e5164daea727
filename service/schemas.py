"""Request and response bodies of the HTTP API (pydantic v2), documented with units.

Arrays travel as JSON lists or in the compact encoded form of
:mod:`nh_serve.client.wire` (``{"b64": ..., "dtype": ..., "shape": ...}`` or
``{"npy": ...}``). Times are seconds on the recording's own clock; rates are Hz
(spikes per second); counts are spikes.

The models check the JSON shape: numbers are finite and never ``true``/``false``, integers
are integers, no unknown fields. Arrays are only checked to be a JSON list or an encoded-array
object here; their elements, and the values (sorted finite times, windows, unit ids, limits),
are checked by :mod:`nh_serve.client.wire`, :mod:`service.handlers` and the Predictor, which
answer 4xx with one message naming the field (never one problem per array element).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel, Strict, WrapValidator
from pydantic_core import PydanticCustomError

from nh_serve.client.wire import DTYPES


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "Input should be a number, not true/false")
    return value


#: A finite number (JSON integers are fine), never true/false.
Number = Annotated[float, BeforeValidator(_no_bool)]
#: An integer, never true/false or 2.0.
Integer = Annotated[int, Strict()]
#: Request models: unknown fields refused, NaN and infinity refused.
_STRICT = dict(extra="forbid", allow_inf_nan=False)

# ----------------------------------------------------------------------------- arrays


class EncodedArray(BaseModel):
    """An array in compact form: raw little-endian values in base64 (``b64`` + ``dtype``
    [+ ``shape``]) or a base64 ``.npy`` file (``npy``). Exactly one of ``b64`` / ``npy``."""

    model_config = ConfigDict(**_STRICT)

    b64: str | None = Field(
        None, description="Base64 (standard alphabet, padded) of the raw little-endian values, C order."
    )
    dtype: Literal[tuple(DTYPES)] | None = Field(  # type: ignore[valid-type]
        None, description="Type of the values in b64: float64, float32, int32 or int64 (little-endian)."
    )
    shape: list[Integer] | None = Field(None, description="Array shape for b64 (default: 1-D).")
    npy: str | None = Field(
        None,
        description="Base64 of a .npy file (numpy.save, allow_pickle=False): numbers or fixed-width strings.",
    )


def _wire_array(value: Any, handler) -> Any:
    """A JSON list (passed on as it is: its elements are checked when it is decoded) or an EncodedArray."""
    if isinstance(value, (list, EncodedArray)):
        return value
    if isinstance(value, dict):
        return EncodedArray.model_validate(value)
    raise PydanticCustomError("wire_array", "Input should be a JSON list or an encoded array object")


def _unit_id_list(value: Any, handler) -> Any:
    """A JSON list of unit ids: all strings or integers (a mix is read as strings), no true/false or numbers."""
    if not isinstance(value, list):
        raise PydanticCustomError("list_type", "Input should be a list of unit ids")
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (str, int)):
            raise PydanticCustomError(
                "unit_id_type",
                "unit ids must be strings or integers; item {index} is {kind}",
                {"index": i, "kind": type(x).__name__ if x is not None else "null"},
            )
    return value


#: Unit ids as a JSON list (schema: strings or integers), checked in one pass.
UnitIdList = Annotated[list[str | int], WrapValidator(_unit_id_list)]


class Float64Array(RootModel[Annotated[list[float] | EncodedArray, WrapValidator(_wire_array)]]):
    """1-D numbers: a JSON list, or an EncodedArray (float64 recommended)."""


class IdArray(RootModel[Annotated[list[str | int] | EncodedArray, WrapValidator(_wire_array)]]):
    """1-D unit ids (strings or integers), or 0-based integer indices into ``unit_table``:
    a JSON list, or an EncodedArray (int32/int64 indices, or an .npy of strings)."""


class FloatMatrix(RootModel[Annotated[list[list[float]] | EncodedArray, WrapValidator(_wire_array)]]):
    """2-D numbers: a JSON list of equal-length rows, or an EncodedArray with ``shape``."""


class FloatTensor(RootModel[list[list[list[float]]] | EncodedArray]):
    """3-D numbers: nested JSON lists, or an EncodedArray with ``shape``."""


# ----------------------------------------------------------------------------- inputs


class SpikeTrain(BaseModel):
    """Spikes as two parallel arrays: the time and the unit of every spike."""

    model_config = ConfigDict(**_STRICT)

    times: Float64Array = Field(
        description="Spike times in seconds (float64), sorted ascending, finite and >= 0, one per spike."
    )
    unit_ids: IdArray = Field(
        description=(
            "The unit of each spike (same length as times): its unit id (string or integer; integer ids "
            "stay integers, sorted numerically), or, when unit_table is given, its 0-based index into unit_table."
        )
    )
    unit_table: UnitIdList | None = Field(
        None,
        description=(
            "Optional list of distinct unit ids (each once); when present, unit_ids holds integer "
            "indices into it (the compact form the Python client sends)."
        ),
    )


class Events(BaseModel):
    """Timed samples of one extra input modality: behaviour inside the context window, image onsets
    inside the context or the forecast window."""

    model_config = ConfigDict(**_STRICT)

    times: Float64Array = Field(
        description=(
            "Sample (or event onset) times in seconds: behaviour inside the context window, images "
            "inside the context or the forecast window."
        )
    )
    values: FloatMatrix = Field(
        description="Values, one row per time: behaviour samples (N, behavior_dim) or image embeddings (N, image_dim)."
    )


_ENCODING = Field(
    "json",
    description=(
        "Encoding of the returned arrays: 'json' (lists of numbers) or 'base64' "
        "(EncodedArray objects: float32 rates, float64 bin edges)."
    ),
)


class RegisterRequest(BaseModel):
    """Register a recording's units from its reference spikes; the answer carries a session token."""

    model_config = ConfigDict(
        **_STRICT,
        json_schema_extra={
            "example": {
                "reference": {
                    "times": [0.5, 1.2, 2.0, 3.1, 4.4, 5.0, 6.3, 7.7, 8.1, 9.9, 10.5, 11.2],
                    "unit_ids": ["a", "b", "a", "b", "a", "b", "a", "b", "a", "b", "a", "b"],
                },
                "reference_start": 0.0,
                "reference_end": 12.0,
            }
        },
    )

    reference: SpikeTrain = Field(description="All spikes of the reference window (seconds).")
    reference_start: Number | None = Field(
        None, description="Start of the reference window, seconds (default: the first spike's time)."
    )
    reference_end: Number | None = Field(
        None,
        description=(
            "End of the reference window, seconds, exclusive (default: just after the last spike). "
            "The window must be at least 10 s long (at most the server's max_reference_s); 60 s is recommended."
        ),
    )
    units: UnitIdList | None = Field(
        None,
        description=(
            "Unit ids in the order predictions should use, including units silent in the reference "
            "(default: the distinct ids of the reference spikes, integers sorted numerically, strings as text)."
        ),
    )
    adapt_steps: Integer = Field(
        0,
        ge=0,
        description=(
            "Gradient steps of test-time adaptation of the unit embeddings on the reference window "
            "(0 = zero-shot; bounded by the server's limit and a time budget)."
        ),
    )
    fit: Literal["reference", "reference-dense", "none"] = Field(
        "reference",
        description=(
            "How the units' population read-outs are set: 'reference' (default) fits each unit's read-out, "
            "a population correction and the recording's calibration on the reference window (kept only where they predict the "
            "window's last part better), 'reference-dense' the same on windows twice as dense (about "
            "twice the time), 'none' uses the zero-shot read-out from the unit descriptors alone."
        ),
    )
    refit_every_s: Number | None = Field(
        None,
        description=(
            "Off by default. While the session streams consecutive contexts, fit the read-outs, the "
            "population correction and the calibration (with the time scale of each unit's level) again every "
            "this many seconds of stream time on the last refit_window_s seconds it saw (a drifting "
            "recording keeps read-outs of its present); at least 1 s."
        ),
    )
    refit_window_s: Number | None = Field(
        None,
        description=(
            "With refit_every_s: how many of the last seconds each refit fits on (default: the reference "
            "length, at least 180 s); at least 45 s. docs/model-card.md compares 60, 180 and 300 s on real recordings."
        ),
    )


class RegisterResponse(BaseModel):
    """A registered session."""

    token: str = Field(
        description="Session token for /predict and /predict_batch: a bearer token, anyone who has it can use the session."
    )
    unit_ids: list[str | int] = Field(
        description="The session's units (in the type they were sent), in the order of every prediction's rows."
    )
    n_units: int = Field(description="Number of units.")
    reference_start: float = Field(description="Start of the reference window used, seconds.")
    reference_end: float = Field(description="End of the reference window used, seconds (exclusive).")
    adaptation: dict | None = Field(
        None,
        description="What test-time adaptation did (steps taken, seconds, Poisson losses, windows), if it ran.",
    )
    fit: dict | None = Field(
        None,
        description=(
            "What the reference fit did: mode, windows, units kept, held-out Poisson NLL per bin before and "
            "after, penalties chosen, seconds (models with a read-out)."
        ),
    )
    model: str = Field(description="Name of the model configuration.")
    model_hash: str = Field(description="Short content hash of the checkpoint's weights.")


class WindowInputs(BaseModel):
    """One context window: the spikes of the second before the prediction time."""

    model_config = ConfigDict(**_STRICT)

    context: SpikeTrain = Field(
        description="Spikes inside [context_start, context_start + 1 s), seconds; units must be registered."
    )
    context_start: Number = Field(
        description="Start of the context window, seconds; predictions start 1 s later."
    )
    behavior: Events | None = Field(
        None,
        description="Behaviour samples inside the context window (only for models trained with behaviour).",
    )
    images: Events | None = Field(
        None,
        description=(
            "Image-presentation onsets and embeddings inside the context or the forecast window "
            "(images shown, and images scheduled to be shown next); only for models trained with images."
        ),
    )
    image_schedule_s: Number | None = Field(
        None,
        description=(
            "Seconds after the context end up to which `images` lists every image (0 to the horizon): "
            "0 = only the images shown so far are known. Default: the horizon if an image lies after "
            "the context end, else 0. Send the horizon with no later image to say none is coming."
        ),
    )
    history_counts: Float64Array | None = Field(
        None,
        description=(
            "Spike count of every registered unit (session order) over the 30 s before context_start "
            "(default: the reference rate stands in)."
        ),
    )
    history_duration_s: Number | None = Field(
        None, description="Seconds covered by history_counts (default 30 s; less near the recording start)."
    )


class PredictRequest(WindowInputs):
    """Predict every unit's firing rate (Hz) in the bins after one context window."""

    model_config = ConfigDict(
        **_STRICT,
        json_schema_extra={
            "example": {
                "reference": {
                    "times": [0.5, 1.2, 2.0, 3.1, 4.4, 5.0, 6.3, 7.7, 8.1, 9.9, 10.5, 11.2],
                    "unit_ids": ["a", "b", "a", "b", "a", "b", "a", "b", "a", "b", "a", "b"],
                },
                "reference_start": 0.0,
                "reference_end": 12.0,
                "context": {"times": [12.1, 12.4, 12.8], "unit_ids": ["a", "b", "a"]},
                "context_start": 12.0,
                "horizon_s": 0.1,
            }
        },
    )

    token: str | None = Field(
        None, description="Session token from /register. Send either token or reference, not both."
    )
    reference: SpikeTrain | None = Field(
        None,
        description=(
            "A new session's reference spikes (seconds): registers the session first and returns its token. "
            "Send either token or reference."
        ),
    )
    reference_start: Number | None = Field(
        None, description="With reference: start of the reference window, seconds."
    )
    reference_end: Number | None = Field(
        None,
        description="With reference: end of the reference window, seconds (at least 10 s after its start).",
    )
    units: UnitIdList | None = Field(
        None, description="With reference: unit ids in the order of the returned rows."
    )
    horizon_s: Number | None = Field(
        None,
        description="Predict only the first horizon_s seconds (a multiple of the 20 ms bin; default the model's 1 s).",
    )
    encoding: Literal["json", "base64"] = _ENCODING


class Prediction(BaseModel):
    """Predicted firing rates of every registered unit."""

    rates_hz: FloatMatrix = Field(description="Firing rate in Hz, (units, bins): row i is unit_ids[i].")
    bin_edges: Float64Array = Field(
        description="Bin edges in seconds, (bins + 1,), starting at context_start + 1 s."
    )
    unit_ids: list[str | int] = Field(description="Unit ids of the rows, in the session's order.")
    model: str = Field(description="Name of the model configuration.")
    model_hash: str = Field(description="Short content hash of the checkpoint's weights.")
    token: str | None = Field(None, description="Session token, when this request registered the session.")


class PredictBatchRequest(BaseModel):
    """Predict many context windows of one session at once."""

    model_config = ConfigDict(
        **_STRICT,
        json_schema_extra={
            "example": {
                "reference": {
                    "times": [0.5, 1.2, 2.0, 3.1, 4.4, 5.0, 6.3, 7.7, 8.1, 9.9, 10.5, 11.2],
                    "unit_ids": ["a", "b", "a", "b", "a", "b", "a", "b", "a", "b", "a", "b"],
                },
                "reference_start": 0.0,
                "reference_end": 12.0,
                "windows": [
                    {"context": {"times": [12.1, 12.4], "unit_ids": ["a", "b"]}, "context_start": 12.0},
                    {"context": {"times": [13.3], "unit_ids": ["a"]}, "context_start": 13.0},
                ],
                "horizon_s": 0.1,
            }
        },
    )

    token: str | None = Field(
        None, description="Session token from /register. Send either token or reference."
    )
    reference: SpikeTrain | None = Field(
        None,
        description="A new session's reference spikes (seconds); registers it first. Send either token or reference.",
    )
    reference_start: Number | None = Field(
        None, description="With reference: start of the reference window, seconds."
    )
    reference_end: Number | None = Field(
        None, description="With reference: end of the reference window, seconds."
    )
    units: UnitIdList | None = Field(None, description="With reference: unit ids in row order.")
    windows: list[WindowInputs] = Field(
        description="The context windows, each with its own context_start (seconds)."
    )
    horizon_s: Number | None = Field(
        None, description="Predict only the first horizon_s seconds (a multiple of the 20 ms bin)."
    )
    encoding: Literal["json", "base64"] = _ENCODING


class BatchPrediction(BaseModel):
    """Predicted firing rates of every registered unit for each window."""

    rates_hz: FloatTensor = Field(description="Firing rate in Hz, (windows, units, bins).")
    bin_edges: FloatMatrix = Field(description="Bin edges in seconds, (windows, bins + 1).")
    unit_ids: list[str | int] = Field(description="Unit ids of the rows, in the session's order.")
    model: str = Field(description="Name of the model configuration.")
    model_hash: str = Field(description="Short content hash of the checkpoint's weights.")
    token: str | None = Field(None, description="Session token, when this request registered the session.")


class ModelInfo(BaseModel):
    """``GET /model``: the served model and this server's limits (no paths, no command lines)."""

    name: str = Field(description="Name of the model configuration.")
    hash: str = Field(description="Short content hash of the checkpoint's weights.")
    backend: str = Field(description="Inference backend computing the predictions.")
    backend_details: dict = Field(description="The backend's settings (device, threads, artifact file name).")
    config: dict = Field(description="The model configuration (sizes; times in seconds).")
    training: dict = Field(description="The checkpoint's training summary.")
    metrics: dict = Field(description="The checkpoint's evaluation metrics.")
    provenance: dict = Field(description="Versions and date the checkpoint was written with.")
    limits: dict = Field(
        description=(
            "What one request may ask and how the server shares itself out (units, spikes, seconds, "
            "bytes; see docs/service.md), and whether an API key is required."
        )
    )
    sessions: dict = Field(description="Session cache: active sessions, hits, misses, evictions.")
