"""CLIP image embeddings of visual stimuli, aligned to their presentations.

``nh-serve embed-images`` computes one CLIP image embedding per stimulus
frame with open_clip and writes it into a session file as
``image_embeddings``: one row per presentation, stamped with the
presentation's start time (seconds), so a model can read what was on the
screen. Everything else in the session file is kept as it was.

Inputs:

* frames: a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``,
  ``.tif``, ``.tiff``) and/or ``.npy`` files holding one image each; a
  frame's name is its file name without the suffix. Or a single ``.npy``
  stack, (N, H, W) grey or (N, H, W, C) colour, whose frames are named
  ``0`` .. ``N-1``. Pixel values: uint8 as they are, uint16 divided by 257,
  floats in [0, 1] scaled by 255 (other floats and ints clipped to [0, 255]).
* presentations: a ``.csv`` / ``.tsv`` table or an ``.npz`` with a start-time
  column (``start_time`` or ``start``, seconds) and a frame column
  (``frame``, ``frame_index``, ``image``, ``image_name``, ``frame_name``,
  ``name`` or ``stimulus``, or the one named by ``frame_column``) holding
  frame indices or names; a name with a file suffix also matches the frame of
  that stem. Without a presentations table the session's own ``trials`` are
  used (e.g. the stimulus presentations of an Allen session). Rows without a
  frame (empty, ``null``, NaN, or a negative index, which Allen uses for a
  blank screen) are skipped.

Embeddings are computed once per distinct frame in batches, with the model's
own preprocessing (resize, centre crop, normalisation), and L2-normalised:
``embedding`` (N_presentations, D_img) float32, each row of unit length.

Weights come from a local file (``weights``: an open_clip / OpenAI CLIP
checkpoint for the named architecture); nothing is downloaded.
``random_weights=True`` builds a randomly initialised model instead, for tests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nh_serve.data.session import open_session, write_session
from nh_serve.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
FRAME_COLUMNS = ("frame", "frame_index", "image", "image_name", "frame_name", "name", "stimulus")
TIME_COLUMNS = ("start_time", "start")
DEFAULT_MODEL = "ViT-L-14"
_WIDE = 1e300  # a window that holds every sample of a session file


# ------------------------------------------------------------------------------------- frames


def load_frames(path) -> dict[str, np.ndarray]:
    """Frames by name, in file-name order (see the module docstring). Each is (H, W) or (H, W, C)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"--frames {p}: not found; pass a folder of images / .npy files or one .npy stack")
    if p.is_file():
        if p.suffix.lower() != ".npy":
            raise InputError(f"--frames {p}: a single file must be a .npy stack (N, H, W) or (N, H, W, C)")
        stack = _load_npy(p)
        if stack.ndim not in (3, 4):
            raise InputError(f"--frames {p}: a .npy stack must be (N, H, W) or (N, H, W, C), got shape {stack.shape}")
        if stack.shape[0] == 0:
            raise InputError(f"--frames {p}: the stack holds no frames")
        return {str(i): stack[i] for i in range(stack.shape[0])}
    frames: dict[str, np.ndarray] = {}
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in (".npy", *IMAGE_SUFFIXES))
    for f in files:
        if f.stem in frames:
            raise InputError(f"--frames {p}: two files are named {f.stem} (with different suffixes); frame names must be unique")
        if f.suffix.lower() == ".npy":
            frames[f.stem] = _load_npy(f)
        else:
            frames[f.stem] = _load_image(f)
    if not frames:
        raise InputError(f"--frames {p}: no .npy or image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    return frames


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: cannot read it as a numpy array ({exc})") from None


def _load_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: cannot read it as an image ({exc})") from None


def to_pil(frame: np.ndarray, name: str):
    """An (H, W) / (H, W, C) / (C, H, W) array as an RGB PIL image (pixel rules in the module docstring)."""
    from PIL import Image

    a = np.asarray(frame)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # (C, H, W) -> (H, W, C)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or min(a.shape[:2]) == 0:
        raise InputError(f"frame {name}: must be (H, W) grey or (H, W, 3|4) colour, got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = (a // 257).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise InputError(f"frame {name}: has NaN or infinite pixels")
        if a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.round(a), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.integer):
            raise InputError(f"frame {name}: pixels must be numbers, got dtype {a.dtype}")
        a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")


# ------------------------------------------------------------------------------- presentations


@dataclass
class Presentations:
    """``times`` (N,) seconds sorted; ``frames`` (N,) frame keys; ``skipped`` rows without a frame."""

    times: np.ndarray
    frames: list[str]
    skipped: int
    source: str


def _frame_key(v) -> str | None:
    """A table cell as a frame key; None for 'no frame'."""
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return None
        if float(v) == round(float(v)):
            v = int(round(float(v)))
        else:
            return str(v)
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return None if int(v) < 0 else str(int(v))
    s = str(v).strip()
    if s.lower() in ("", "null", "nan", "none"):
        return None
    try:
        f = float(s)
    except ValueError:
        return s
    return _frame_key(f)


def presentations_from_columns(columns: dict, *, source: str, frame_column=None, time_column=None) -> Presentations:
    """Pick the time and frame columns of a table (dict of 1-D arrays) and drop rows without a frame."""
    names = list(columns)
    tcol = time_column or next((c for c in TIME_COLUMNS if c in columns), None)
    if tcol is None or tcol not in columns:
        raise InputError(
            f"{source}: no start-time column ({time_column or ' or '.join(TIME_COLUMNS)}); columns are {', '.join(names)}"
        )
    fcol = frame_column or next((c for c in FRAME_COLUMNS if c in columns), None)
    if fcol is None or fcol not in columns:
        raise InputError(
            f"{source}: no frame column ({frame_column or ', '.join(FRAME_COLUMNS)}); columns are {', '.join(names)}; "
            "name it with --frame-column"
        )
    t = np.asarray(columns[tcol])
    if t.dtype.kind not in "iuf":
        raise InputError(f"{source}: start times ({tcol}) must be numbers of seconds, got dtype {t.dtype}")
    t = t.astype(np.float64).reshape(-1)
    keys = [_frame_key(v) for v in np.asarray(columns[fcol]).reshape(-1).tolist()]
    if len(keys) != t.size:
        raise InputError(f"{source}: {t.size} start times but {len(keys)} frames")
    keep = np.asarray([k is not None for k in keys], dtype=bool)
    if not keep.any():
        raise InputError(f"{source}: no row of column {fcol} names a frame; check --frame-column")
    t = t[keep]
    frames = [k for k in keys if k is not None]
    if not np.all(np.isfinite(t)):
        raise InputError(f"{source}: start times ({tcol}) must be finite seconds")
    order = np.argsort(t, kind="stable")
    return Presentations(
        times=t[order], frames=[frames[i] for i in order], skipped=int((~keep).sum()), source=source
    )


def load_presentations(path, *, frame_column=None, time_column=None) -> Presentations:
    """Read a presentations table from ``.csv`` / ``.tsv`` / ``.txt`` or ``.npz``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"--presentations {p}: not found; pass a .csv/.tsv table or an .npz with start_time and frame")
    if p.suffix.lower() == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                cols = {k: z[k] for k in z.files}
        except (ValueError, OSError) as exc:
            raise InputError(f"{p}: cannot read it as a numpy .npz archive ({exc})") from None
    else:
        import pandas as pd

        sep = "\t" if p.suffix.lower() == ".tsv" else None
        try:
            df = pd.read_csv(p, sep=sep, engine="python")
        except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
            raise InputError(f"{p}: cannot read it as a table ({exc})") from None
        cols = {str(c).strip(): df[c].to_numpy() for c in df.columns}
    return presentations_from_columns(cols, source=str(p), frame_column=frame_column, time_column=time_column)


def match_frames(pres: Presentations, frames: dict[str, np.ndarray], *, frames_source: str) -> list[str]:
    """The frame name of each presentation; a key with a file suffix also matches its stem."""
    out = []
    missing = []
    for k in pres.frames:
        if k in frames:
            out.append(k)
        elif Path(k).stem in frames:
            out.append(Path(k).stem)
        else:
            missing.append(k)
    if missing:
        uniq = sorted(set(missing))
        have = list(frames)[:5]
        raise InputError(
            f"{pres.source}: {len(missing)} presentation(s) show frames that are not in {frames_source} "
            f"(e.g. {', '.join(uniq[:5])}; frames there include {', '.join(have)}); "
            "the presentations and frames do not match"
        )
    return out


# ------------------------------------------------------------------------------------- model


def load_clip(model_name: str = DEFAULT_MODEL, *, weights=None, random_weights: bool = False, device: str = "cpu"):
    """Build an open_clip model and its evaluation preprocessing.

    ``weights``: a local checkpoint file; ``random_weights=True``: random init
    (for tests). Exactly one of the two. Returns ``(model, preprocess)``.
    """
    if weights is None and not random_weights:
        raise InputError(
            "--weights: pass a local CLIP checkpoint file for the model (nothing is downloaded), "
            "or --random-weights for a randomly initialised model (testing only)"
        )
    if weights is not None and random_weights:
        raise InputError("pass either --weights or --random-weights, not both")
    if weights is not None:
        wp = Path(weights).expanduser()
        if not wp.is_file():
            raise InputError(f"--weights {wp}: not found; pass the path of a local CLIP checkpoint file")
    import open_clip  # the optional CLIP extra (nh-serve[clip]), needed only here

    if model_name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if model_name.lower().split("-")[0] in m.lower()][:8]
        raise InputError(f"--model {model_name}: not an open_clip architecture (e.g. {', '.join(close) or 'ViT-L-14, ViT-B-32'})")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(Path(weights).expanduser()) if weights is not None else None, device=device
        )
    except Exception as exc:  # noqa: BLE001 - torch/open_clip raise many kinds for a bad checkpoint
        raise InputError(
            f"--weights {weights}: cannot load it into {model_name} ({type(exc).__name__}: {str(exc)[:300]}); "
            "pass a checkpoint of that architecture"
        ) from None
    model.eval()
    return model, preprocess


def embed_frames(model, preprocess, frames: list, names: list[str], *, batch_size: int = 32, device: str = "cpu") -> np.ndarray:
    """CLIP image embeddings of ``frames``: (N, D) float32, each row L2-normalised."""
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    out = []
    with torch.inference_mode():
        for lo in tqdm(range(0, len(frames), batch_size), desc="embedding frames", unit="batch", disable=len(frames) <= batch_size):
            batch = torch.stack(
                [preprocess(to_pil(f, n)) for f, n in zip(frames[lo : lo + batch_size], names[lo : lo + batch_size])]
            ).to(device)  # (B, 3, H, W)
            emb = model.encode_image(batch).float()  # (B, D)
            emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            out.append(emb.cpu().numpy())
    return np.concatenate(out, axis=0).astype(np.float32)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------- session


def embed_images(
    *,
    frames,
    session,
    presentations=None,
    out=None,
    model_name: str = DEFAULT_MODEL,
    weights=None,
    random_weights: bool = False,
    frame_column: str | None = None,
    time_column: str | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    overwrite: bool = False,
) -> Path:
    """Add CLIP ``image_embeddings`` to a session file; returns the path written.

    ``out`` None rewrites ``session`` in place (atomically). All other members
    of the session are kept. Raises :class:`InputError` /
    :class:`~nh_serve.errors.SessionFileError` before anything is written when
    the inputs do not fit together.
    """
    session = Path(session).expanduser()
    target = Path(out).expanduser() if out is not None else session
    if out is not None:
        if target.is_dir():
            raise InputError(f"--out {target}: is a folder; pass a file path")
        if not target.parent.is_dir():
            raise InputError(f"--out {target}: folder {target.parent} does not exist; create it first")
        if target.exists() and target.resolve() != session.resolve() and not overwrite:
            raise InputError(f"--out {target}: file exists; pass --overwrite to replace it")

    with open_session(session) as s:
        if presentations is not None:
            pres = load_presentations(presentations, frame_column=frame_column, time_column=time_column)
        else:
            if s.trials is None:
                raise InputError(f"{session}: has no trials to take presentations from; pass --presentations TABLE")
            pres = presentations_from_columns(
                s.trials, source=f"{session} trials", frame_column=frame_column, time_column=time_column
            )
        outside = (pres.times < s.start) | (pres.times >= s.end)
        if outside.any():
            t = float(pres.times[np.flatnonzero(outside)[0]])
            raise InputError(
                f"{pres.source}: a presentation starts at {t:.6g} s, outside the session's extent "
                f"[{s.start:.6g}, {s.end:.6g}) s; are the presentation times on the recording's clock?"
            )
        all_frames = load_frames(frames)
        keys = match_frames(pres, all_frames, frames_source=str(frames))
        model, preprocess = load_clip(model_name, weights=weights, random_weights=random_weights, device=device)

        # read everything else before the file is replaced
        spike_t, spike_u = s.spikes(-_WIDE, _WIDE)
        members = {
            "unit_ids": s.unit_ids,
            "start": s.start,
            "end": s.end,
            "units_extra": {k: v for k, v in s.units_table.items() if k != "id"} or None,
            "behavior": s.behavior(-_WIDE, _WIDE),
            "trials": s.trials,
            "true_rates": None,
        }
        tr = s.true_rates(-_WIDE, _WIDE)
        if tr is not None:
            members["true_rates"] = (tr[1], s.true_rate_bin_size)
        prov = dict(s.provenance)

    unique = list(dict.fromkeys(keys))  # each distinct frame once, in first-shown order
    emb = embed_frames(model, preprocess, [all_frames[k] for k in unique], unique, batch_size=batch_size, device=device)
    row = {k: i for i, k in enumerate(unique)}
    per_presentation = emb[[row[k] for k in keys]]  # (N_presentations, D)

    import open_clip
    import torch

    wpath = Path(weights).expanduser() if weights is not None else None
    prov.setdefault("first_written_by", prov.pop("written_by", None))
    prov["image_embeddings"] = {
        "model": model_name,
        "weights": "random initialisation (testing only)" if wpath is None else wpath.name,
        "weights_sha256": None if wpath is None else _sha256(wpath),
        "open_clip": open_clip.__version__,
        "torch": torch.__version__,
        "frames": str(Path(frames).expanduser().resolve()),
        "presentations": pres.source,
        "n_presentations": int(len(keys)),
        "n_frames_embedded": int(len(unique)),
        "rows_without_frame_skipped": int(pres.skipped),
        "dim": int(per_presentation.shape[1]),
        "normalised": "L2",
    }
    return write_session(
        target,
        spike_times=spike_t,
        unit_index=spike_u,
        image_embeddings=(pres.times, per_presentation),
        provenance=prov,
        **members,
    )
