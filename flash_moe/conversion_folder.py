"""The destination folder of a conversion: made and locked, cleared with ``overwrite``, and resumed: what an
earlier run from the same source with the same settings finished (progress.json, or a finished layout.json)
is kept; another source or other settings are refused. Both converters (convert and convert_families) go
through ``destination``."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .files import CheckpointError, atomic_write_json, locked, read_json, remove_entry
from .layout import ExpertLayout, ModelLayout

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
PROGRESS = "progress.json"
RESIDENT = "resident.safetensors"
START_OVER = "pass --overwrite (overwrite=True) to start over, or choose another destination"
OWN_FILES = (RESIDENT, "resident.partial.safetensors", "layout.json", PROGRESS, "config.json", *TOKENIZER_FILES)
LAYER_FILE = re.compile(r"layer_\d+\.bin(\.partial)?")


@contextmanager
def destination(dst: Path, settings: dict, source: dict, layout: ExpertLayout, overwrite: bool) -> Iterator[dict]:
    """DST made and locked for the ``with`` block, cleared first with ``overwrite``, and the state to write to
    progress.json: what an earlier run from the same source with the same settings finished (another
    source or other settings are refused). Both converters (this one and convert_families) go through here."""
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot create the destination folder ({e.strerror})") from None
    with locked(dst):
        if overwrite:
            _clear(dst)
        state = _resume(dst, settings, source, layout)  # first: from here on DST says "unfinished"
        _experts_folder(dst)
        yield state


def _clear(dst: Path) -> None:
    """``overwrite``: remove what a conversion writes into DST, nothing else (links themselves, never targets)."""
    for name in OWN_FILES:
        remove_entry(dst / name)
        remove_entry(dst / (name + ".tmp"))
    experts = dst / "experts"
    if os.path.isdir(experts) and not os.path.islink(experts):
        for p in experts.iterdir():
            if LAYER_FILE.fullmatch(p.name):
                remove_entry(p)
    elif os.path.lexists(experts):
        remove_entry(experts)


def _experts_folder(dst: Path) -> None:
    """DST/experts as a real folder: a link there (even to a folder) is removed, so that no layer file is
    written outside DST."""
    experts = dst / "experts"
    if os.path.lexists(experts) and not (os.path.isdir(experts) and not os.path.islink(experts)):
        remove_entry(experts)
    experts.mkdir(exist_ok=True)


def file_size(path: Path) -> int | None:
    """The size of a regular file at ``path`` itself (not through a link), or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _describe(source: dict) -> str:
    if source.get("hub_id"):
        revision = f"@{source['revision']}" if source.get("revision") else ""
        return f"{source['hub_id']}{revision} ({source['path']})"
    return source["path"]


def _same_source(dst: Path, old: dict | None, source: dict, holds: str) -> None:
    """Refuse to continue or redo a conversion from anything but the source it started from."""
    if not isinstance(old, dict) or "path" not in old or "fingerprint" not in old:
        raise CheckpointError(f"{dst}: holds {holds} whose source is not recorded (an older flash_moe made it); "
                              f"{START_OVER}")
    if old["path"] != source["path"]:
        raise CheckpointError(f"{dst}: holds {holds} of {_describe(old)}, not of {_describe(source)}; {START_OVER}")
    if old["fingerprint"] != source["fingerprint"]:
        raise CheckpointError(f"{dst}: holds {holds} of {_describe(old)} as it was ({old['fingerprint'][:19]}); its "
                              f"config or tensor headers have changed since ({source['fingerprint'][:19]}); {START_OVER}")


def _differences(old, new: dict) -> str:
    """``bits 4 there, 8 now; ...`` for the settings that differ."""
    old = old if isinstance(old, dict) else {}
    return "; ".join(f"{k} {old.get(k)} there, {v} now" for k, v in new.items() if old.get(k) != v)


def _resume(dst: Path, settings: dict, source: dict, layout: ExpertLayout) -> dict:
    """What an earlier run from the same source with the same settings finished, as the new progress.json
    (written at once: from here on the folder says a conversion is under way)."""
    progress, final = dst / PROGRESS, dst / "layout.json"
    state = {"source": source, "settings": settings, "layers": {}, "resident": None, "quantization": None}
    # Only regular files count: convert never makes links or FIFOs, so one there is not its record (and
    # is replaced, never followed)
    if file_size(progress) is not None:
        data = read_json(progress)
        data = data if isinstance(data, dict) else {}
        _same_source(dst, data.get("source"), source, "an unfinished conversion")
        if data.get("settings") != settings:
            raise CheckpointError(f"{dst}: holds an unfinished conversion with other settings "
                                  f"({_differences(data.get('settings'), settings)}); {START_OVER}")
        layers = data.get("layers")
        state.update(layers=layers if isinstance(layers, dict) else {}, resident=data.get("resident"),
                     quantization=data.get("quantization"))
    elif file_size(final) is not None:
        data = read_json(final)
        record = data.get("conversion") if isinstance(data, dict) else None
        _same_source(dst, (record or {}).get("source"), source, "a finished conversion")
        old = ModelLayout.from_json(data, str(final))
        if old.expert != layout or record.get("settings") != settings:
            raise CheckpointError(f"{dst}: already holds a model converted with other settings "
                                  f"({_differences(record.get('settings'), settings)}); {START_OVER}")
        state["layers"] = {str(k): v for k, v in old.checksums.items()}
        try:  # the finished resident file stays, with the quantization block its config.json records
            config = read_json(dst / "config.json")
        except (FileNotFoundError, CheckpointError):
            config = None  # the resident weights are written again
        if isinstance(config, dict) and file_size(dst / RESIDENT) is not None:
            state.update(resident=file_size(dst / RESIDENT), quantization=config.get("quantization"))
    # Until layout.json is rewritten the folder must not look complete; progress.json keeps the finished
    # parts known if this run stops before that.
    atomic_write_json(progress, state)
    remove_entry(final)
    return state
