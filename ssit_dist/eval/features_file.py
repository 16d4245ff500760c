"""Frozen features as a file: computed in one place (a GPU run, another machine), evaluated in another
(eval/crossval.py) by the same code. An .npz of `keys` (one per photograph) and `features/<method>`
arrays, readable without pickle."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ssit_dist.atomic import write_with

FEATURE_PREFIX = "features/"  # the .npz entry of method m is "features/m", beside "keys"


def save_features(path: str | Path, keys: Sequence[str], features: Mapping[str, np.ndarray]) -> Path:
    """Write `keys` (one per row, e.g. the image's relative path) and each method's (rows, dim) features
    as an .npz that loads without pickle (strings as a fixed-width unicode array), atomically."""
    keys_array = np.asarray(list(keys), dtype=np.str_)
    if len(set(keys_array.tolist())) != len(keys_array):
        raise ValueError(f"{path}: keys must be unique (one per photograph)")
    arrays: dict[str, Any] = {"keys": keys_array}  # Any: numpy's stub types **kwds like savez's own flags
    for method, x in features.items():
        if not method or np.ndim(x) != 2 or len(x) != len(keys_array):
            raise ValueError(f"{path}: features {method!r} are {np.shape(x)}, expected ({len(keys_array)}, dim)")
        arrays[FEATURE_PREFIX + method] = np.asarray(x)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez(f, allow_pickle=False, **arrays)

    return write_with(Path(path), write)


def load_features(path: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """(keys, {method: (rows, dim) features}) from a file of `save_features`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    # A file that is not a zip is taken for a pickle, which allow_pickle=False refuses with a ValueError.
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read as an .npz of save_features ({e})") from None
    if "keys" not in arrays:
        raise ValueError(f"{path}: no 'keys' array; write the file with ssit_dist.eval.features_file.save_features")
    keys = arrays.pop("keys").tolist()
    features = {name[len(FEATURE_PREFIX) :]: x for name, x in arrays.items() if name.startswith(FEATURE_PREFIX)}
    if not features:
        raise ValueError(f"{path}: no '{FEATURE_PREFIX}<method>' arrays beside 'keys'")
    return [str(k) for k in keys], features


def rows_of(keys: Sequence[str], wanted: Sequence[str], source: str = "features file") -> np.ndarray:
    """Row index in `keys` of each of `wanted` (the labelled photographs, in the labels' order), so that
    features line up with grades; names the first missing keys."""
    index = {key: i for i, key in enumerate(keys)}
    missing = [key for key in wanted if key not in index]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} of the labelled photographs, e.g. {missing[:3]}")
    return np.array([index[key] for key in wanted], np.int64)
