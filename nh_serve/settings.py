"""One way to declare settings: frozen, keyword-only, typed dataclasses checked by pydantic.

The model config, the training config, the scoring settings and the service
settings are all declared the same way::

    @settings(where="model config")
    class ModelConfig(Settings):
        dim: int = 128
        context_s: float = 1.0

        def __post_init__(self) -> None:            # rules between fields, after the types
            if self.dim < 1:
                self.fail("dim", f"must be >= 1, got {self.dim}")

- Types are checked strictly (pydantic's strict mode): an ``int`` field refuses ``1.0``
  and ``True``, a ``float`` field refuses ``"1"`` and ``nan``, a ``bool`` field refuses
  ``1``; ints are fine for floats (stored as floats) and lists for tuples.
- Every invalid value raises the class's error type (``ValueError``, or
  :class:`~nh_serve.errors.InputError` for settings people type) with one message in one
  style, ``"<where>: <field> <problem>"``, e.g. ``"model config: dim must be of type int,
  got 64.0"``, never pydantic's own report. ``names`` maps a field to the name people know
  it by (a command-line option such as ``--stride``), which then stands alone.
- ``to_dict()`` (JSON-ready: tuples as lists), ``from_dict(d)`` (missing fields take their
  defaults, unknown ones are refused by name) and ``replace(**changes)`` (a validated copy).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NoReturn

from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

# pydantic error types -> how the message says what was expected.
_TYPE_ERRORS = {
    "finite_number": "must be a finite number",
}


class Settings:
    """Base of every settings class; declare one with :func:`settings`."""

    _where: ClassVar[str | None] = None
    _error: ClassVar[type[Exception]] = ValueError
    _names: ClassVar[dict[str, str]] = {}

    @classmethod
    def _message(cls, field: str, problem: str, where: str | None = None) -> str:
        name = cls._names.get(field)
        where = where if where is not None else cls._where
        if name is not None:
            return f"{name}: {problem}"
        return f"{where}: {field} {problem}" if where else f"{field} {problem}"

    @classmethod
    def _fail(cls, field: str, problem: str) -> NoReturn:
        err = cls._error(cls._message(field, problem))
        err.settings_field, err.settings_problem = field, problem  # so from_dict can name another source
        raise err

    def fail(self, field: str, problem: str) -> NoReturn:
        """Raise the class's error for ``field`` (``problem`` says what is wrong and how to fix it)."""
        self._fail(field, problem)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def _check_known(cls, keys, where: str | None = None) -> None:
        known = cls.field_names()
        unknown = sorted(set(keys) - set(known))
        if unknown:
            w = where if where is not None else cls._where
            raise cls._error(
                f"{w + ': ' if w else ''}unknown field(s) {', '.join(unknown)}; "
                f"known fields are {', '.join(sorted(known))}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of all fields (tuples as lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str | None = None):
        """Build from :meth:`to_dict` output (missing fields take defaults; unknown ones are refused).

        ``where`` names the source in messages instead of the class's own name (e.g. a file).
        """
        what = where if where is not None else cls._where
        if not isinstance(d, dict):
            raise cls._error(f"{what + ': ' if what else ''}must be a dict of fields, got {type(d).__name__}")
        cls._check_known(d, where)
        try:
            return cls(**d)
        except cls._error as exc:
            if where is None or not hasattr(exc, "settings_field"):
                raise
            raise cls._error(cls._message(exc.settings_field, exc.settings_problem, where)) from None

    def replace(self, **changes: Any):
        """A validated copy with some fields changed; unknown fields are refused."""
        self._check_known(changes)
        return dataclasses.replace(self, **changes)


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def _as_tuples(v: Any) -> Any:
    """Lists (and lists inside them) as tuples, for tuple-typed fields."""
    return tuple(_as_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def settings(
    *, where: str | None = None, error: type[Exception] = ValueError, names: dict[str, str] | None = None
):
    """Class decorator: a frozen, keyword-only pydantic dataclass with :class:`Settings` messages.

    ``where`` starts every message (e.g. ``"model config"``); ``error`` is the exception type
    (a ``ValueError`` subclass); ``names``: field -> the name people know it by.
    """

    def wrap(cls):
        cls._where, cls._error, cls._names = where, error, dict(names or {})
        pcls = _pydantic_dataclass(
            frozen=True,
            kw_only=True,
            config=ConfigDict(strict=True, allow_inf_nan=False, arbitrary_types_allowed=True),
        )(cls)
        tuple_fields = {f.name for f in dataclasses.fields(pcls) if "tuple[" in str(f.type)}
        types = {f.name: getattr(f.type, "__name__", str(f.type)) for f in dataclasses.fields(pcls)}
        validate = pcls.__init__

        @functools.wraps(validate)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if args:
                raise TypeError(f"{cls.__name__} takes keyword arguments only, got {len(args)} positional")
            for k in tuple_fields & set(kwargs):
                kwargs[k] = _as_tuples(kwargs[k])
            try:
                validate(self, **kwargs)
            except ValidationError as exc:
                first = exc.errors()[0]
                raised = (first.get("ctx") or {}).get("error")
                if isinstance(raised, Exception):  # raised by __post_init__ (a rule between fields)
                    raise raised from None
                field = str(first["loc"][0]) if first["loc"] else "?"
                got = kwargs.get(field, first.get("input"))
                problem = _TYPE_ERRORS.get(first["type"], f"must be of type {types.get(field, '?')}")
                pcls._fail(field, f"{problem}, got {got!r}")

        pcls.__init__ = __init__
        return pcls

    return wrap
