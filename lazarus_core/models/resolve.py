"""Turns a model argument (local directory, built-in alias, Hugging Face id) into a source of files that
fetches each weight file only when a tensor in it is first needed.

Safety: only ``config.json``, the safetensors index and safetensors shards are ever opened; pickle
weights (``.bin``, ``.pt``, ``.pth``) are refused; no code from the checkpoint is run.

Every hub failure (missing file, HTTP error, truncated or interrupted download, offline cache miss) becomes
one line naming the model, revision and file; huggingface_hub 2.x keeps nothing partial in its cache, so the
cache stays usable and a rerun after the cause is fixed downloads the file again.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from lazarus_core.models.errors import CheckpointError, ModelNotFoundError, UnsafeCheckpointError

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class DownloadError(ModelNotFoundError):
    """A hub download failed part way (HTTP error status, truncated or interrupted transfer)."""


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks huggingface_hub not to touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class ModelSource:
    """Where a checkpoint's files come from.

    Attributes
    ----------
    name : str
        What the user passed (directory, alias or hub id).
    kind : {"local", "builtin", "hub"}
    revision : str or None
        Hub revision (branch, tag or commit) when ``kind == "hub"``.
    """

    def __init__(self, name: str, kind: str, *, root: Path | None = None, revision: str | None = None):
        self.name = name
        self.kind = kind
        self.root = root
        self.revision = revision
        self._fetched: dict[str, Path] = {}
        self._opened: dict[str, Path] = {}
        self._offline_misses: list[ModelNotFoundError] = []
        self._remote_sizes: dict[str, int] | None = None

    def __repr__(self) -> str:
        return f"ModelSource({self.name!r}, kind={self.kind!r}, revision={self.revision!r})"

    def describe(self, filename: str) -> str:
        """A human-readable location for ``filename`` (for error messages)."""
        if self.kind == "hub":
            return f"{self.name}@{self.revision or 'main'}:{filename}"
        return str(self.root / filename)

    def exists(self, filename: str) -> bool:
        """Whether ``filename`` exists (for the hub: can be fetched); downloads it if so."""
        if self.kind != "hub":
            return (self.root / filename).is_file()
        try:
            self.local_path(filename)
        except ModelNotFoundError as exc:
            if getattr(exc, "missing_entry", False):
                return False
            if getattr(exc, "offline_miss", False):
                self._offline_misses.append(exc)
                return False
            raise
        return True

    def local_path(self, filename: str) -> Path:
        """Local path of ``filename``, downloading just that file from the hub on first use.

        Raises
        ------
        ModelNotFoundError
            The file is absent locally / on the hub, or not cached while ``HF_HUB_OFFLINE=1``.
        """
        if self.kind != "hub":
            path = self.root / filename
            if not path.is_file():
                raise ModelNotFoundError(f"{path}: file not found")
        else:
            if filename not in self._fetched:
                self._fetched[filename] = self._download(filename)
            path = self._fetched[filename]
        self._opened[filename] = path
        return path

    def files_opened(self) -> dict[str, int]:
        """File name -> size in bytes of every file handed out by :meth:`local_path` (downloaded or local), in
        the order first asked for: what a job really read (config, index, the shards it touched)."""
        return {name: path.stat().st_size for name, path in self._opened.items()}

    def file_size(self, filename: str) -> int | None:
        """Size of ``filename`` in bytes WITHOUT downloading it: on disk for a local model or a cached hub file,
        else from the hub's file listing (one API call per source, skipped offline); None when unknown."""
        if self.kind != "hub":
            path = self.root / filename
            return path.stat().st_size if path.is_file() else None
        cached = self.cached_path(filename)
        if cached is not None:
            return cached.stat().st_size
        return self.remote_sizes().get(filename)

    def cached_path(self, filename: str) -> Path | None:
        """The local path of ``filename`` if it needs no download (local model, or in the hub cache), else None."""
        if self.kind != "hub":
            path = self.root / filename
            return path if path.is_file() else None
        if filename in self._fetched:
            return self._fetched[filename]
        import huggingface_hub

        found = huggingface_hub.try_to_load_from_cache(self.name, filename, revision=self.revision)
        return Path(found) if isinstance(found, str) else None

    def remote_sizes(self) -> dict[str, int]:
        """File name -> size of every file of the hub revision (``model_info(files_metadata=True)``); ``{}`` for
        local models, offline, or when the listing cannot be fetched (sizes are then unknown, not guessed)."""
        if self._remote_sizes is None:
            self._remote_sizes = {}
            if self.kind == "hub" and not hub_offline():
                import huggingface_hub

                try:
                    info = huggingface_hub.model_info(self.name, revision=self.revision, files_metadata=True)
                except (OSError, ValueError, *_transport_errors()):  # unreachable, an HTTP error, a malformed answer
                    return self._remote_sizes
                self._remote_sizes = {s.rfilename: s.size for s in info.siblings or () if s.size is not None}
        return self._remote_sizes

    def _download(self, filename: str) -> Path:
        import huggingface_hub  # looked up at call time so tests can substitute hf_hub_download
        from huggingface_hub import errors as hub_errors

        where = self.describe(filename)
        try:
            return Path(huggingface_hub.hf_hub_download(self.name, filename, revision=self.revision))
        except hub_errors.LocalEntryNotFoundError as exc:
            # Not in the local cache, and offline (by setting, or the hub could not be reached / answered an error).
            cause = exc.__cause__
            if hub_offline():
                msg = (f"{where} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                       f"forbids downloading it; fetch the model once online (or unset HF_HUB_OFFLINE)")
            elif isinstance(cause, hub_errors.HfHubHTTPError) and cause.response is not None:
                msg = (f"{where}: not in the local Hugging Face cache and the hub answered HTTP "
                       f"{cause.response.status_code} for {cause.response.url}")
            else:
                reason = f" ({type(cause).__name__}: {_one_line(cause)})" if cause is not None else ""
                msg = f"{where}: not in the local Hugging Face cache and the hub could not be reached{reason}"
            err = ModelNotFoundError(msg)
            err.offline_miss = True
            raise err from None
        except (hub_errors.RemoteEntryNotFoundError, hub_errors.EntryNotFoundError):
            err = ModelNotFoundError(f"{self.describe(filename)}: no such file in the repository")
            err.missing_entry = True
            raise err from None
        except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as exc:
            raise ModelNotFoundError(
                f"model {self.name!r} (revision {self.revision or 'main'}) not found on the Hugging Face hub and "
                f"not a local directory or built-in alias ({type(exc).__name__})"
            ) from None
        except hub_errors.HfHubHTTPError as exc:  # an HTTP error status during the transfer itself
            status = exc.response.status_code if exc.response is not None else "error"
            raise DownloadError(f"{where}: download failed, the hub answered HTTP {status} ({_one_line(exc)}); "
                                f"{_NOTHING_CACHED}") from None
        except OSError as exc:  # truncated transfer (size check), disk full, other I/O
            raise DownloadError(f"{where}: download failed ({_one_line(exc)}); {_NOTHING_CACHED}") from None
        except _transport_errors() as exc:  # connection dropped mid-transfer after huggingface_hub's own retries
            raise DownloadError(f"{where}: download interrupted ({type(exc).__name__}: {_one_line(exc)}); "
                                f"{_NOTHING_CACHED}") from None

    def read_json(self, filename: str) -> dict[str, Any]:
        """Parse ``filename`` as a JSON object; CheckpointError names the file when it is not one."""
        path = self.local_path(filename)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.describe(filename)}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{self.describe(filename)}: expected a JSON object")
        return data

    def index_weight_map(self) -> dict[str, str] | None:
        """The validated ``weight_map`` of ``model.safetensors.index.json``, or None when there is no index.

        Fetches at most the index itself (never a shard).

        Raises
        ------
        UnsafeCheckpointError
            The index maps a tensor to a pickle file.
        CheckpointError
            A malformed index (names the index file).
        """
        if not self.exists(INDEX_NAME):
            return None
        index = self.read_json(INDEX_NAME)
        wmap = index.get("weight_map")
        if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
            raise CheckpointError(f"{self.describe(INDEX_NAME)}: 'weight_map' must map tensor names to file names")
        for tensor, fname in wmap.items():
            if fname.endswith(PICKLE_SUFFIXES):
                raise UnsafeCheckpointError(
                    f"{self.describe(INDEX_NAME)}: tensor {tensor!r} lives in {fname!r}, a pickle file; lazarus "
                    f"never loads pickles (they can run code). Convert the checkpoint to safetensors."
                )
            if "/" in fname or "\\" in fname or fname.startswith(".") or not fname.endswith(".safetensors"):
                raise CheckpointError(f"{self.describe(INDEX_NAME)}: tensor {tensor!r} maps to an invalid "
                                      f"file name {fname!r} (expected a .safetensors file beside the index)")
        return dict(wmap)

    def weight_map(self) -> dict[str, str]:
        """Tensor name -> safetensors file name (from the index, or the single ``model.safetensors``).

        Raises
        ------
        UnsafeCheckpointError
            Only pickle weights are present.
        CheckpointError
            No safetensors weights, or a malformed index (names the index file).
        """
        wmap = self.index_weight_map()
        if wmap is not None:
            return wmap
        if self.exists(SINGLE_NAME):
            return {}  # filled from the file's own header by the reader
        if self._offline_misses:
            raise self._offline_misses[-1]
        pickles = self._pickle_files()
        if pickles:
            raise UnsafeCheckpointError(
                f"{self.name}: only pickle weights found ({', '.join(pickles)}); lazarus never loads pickles (they "
                f"can run code). Convert the checkpoint to safetensors (e.g. with transformers' save_pretrained)."
            )
        raise CheckpointError(f"{self.name}: no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}) found")

    def _pickle_files(self) -> list[str]:
        if self.kind == "hub":
            candidates = ("pytorch_model.bin.index.json", "pytorch_model.bin")
            return [c for c in candidates if self._hub_has(c)]
        return sorted(p.name for p in self.root.iterdir() if p.name.endswith(PICKLE_SUFFIXES)
                      or p.name == "pytorch_model.bin.index.json")

    def _hub_has(self, filename: str) -> bool:
        try:
            return self.exists(filename)
        except ModelNotFoundError:
            return False


_NOTHING_CACHED = "the cache is left usable; rerun to download it again"


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (library messages often span several lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _transport_errors() -> tuple[type[BaseException], ...]:
    """huggingface_hub's HTTP client errors (httpx2 in huggingface_hub 2.x, httpx in 1.x), or ``()``."""
    for module in ("httpx2", "httpx"):
        try:
            return (__import__(module).HTTPError,)
        except ImportError:
            continue
    return ()


def _builtin_path(alias: str) -> Path | None:
    try:
        from lazarus_core.models import builtin
    except ImportError:
        return None
    resolve = getattr(builtin, "resolve_builtin", None)
    if resolve is None:
        return None
    path = resolve(alias)
    return Path(path) if path is not None else None


def resolve_model(model: str | os.PathLike, *, revision: str | None = None) -> ModelSource:
    """Find where ``model`` lives: a local directory, a built-in alias, or a Hugging Face hub id.

    Parameters
    ----------
    model : str or PathLike
        Local directory with ``config.json`` and safetensors; a built-in alias (see
        ``lazarus models --json``); or a hub id such as ``"allenai/OLMoE-1B-7B-0924"``.
    revision : str, optional
        Hub branch, tag or commit (ignored for local directories and aliases).

    Returns
    -------
    ModelSource
        Nothing is downloaded yet except, for a hub id, ``config.json`` (fetched by the caller).

    Raises
    ------
    ModelNotFoundError
        Not an existing directory, not an alias, and not a valid hub id; or a local directory without
        ``config.json``.
    """
    name = os.fspath(model)
    path = Path(name).expanduser()
    if path.is_dir():
        return _local(name, path, "local")
    builtin = _builtin_path(name)
    if builtin is not None:
        return _local(name, builtin, "builtin")
    if path.exists():
        raise ModelNotFoundError(f"{path}: expected a checkpoint directory, got a file")
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or name.count("/") > 1
    if looks_like_path or not _HUB_ID.match(name):
        raise ModelNotFoundError(f"model {name!r}: no such directory, not a built-in alias, and not a hub id")
    return ModelSource(name, "hub", revision=revision)


def _local(name: str, root: Path, kind: str) -> ModelSource:
    if not (root / CONFIG_NAME).is_file():
        raise ModelNotFoundError(f"{root / CONFIG_NAME}: missing config.json; {root} is not a model checkpoint")
    return ModelSource(name, kind, root=root)
