"""The fine-tune registry: PEFT adapters persisted in the data directory, found by name or id.

Layout: ``<data_dir>/finetunes/<id>/{meta.json, adapter_config.json, adapter_model.safetensors}``, where ``<id>`` is a
UUID the registry generates and ``meta.json`` holds ``{id, name, model, description, public, created_at, modified_at}``.

Invariants: every path the registry touches is built from a validated id (a lowercase UUID) or one of the two asset
names, lies directly under ``<data_dir>/finetunes`` and is never a symbolic link; files appear atomically (written under
a temporary name in the same folder, validated, then renamed), so a failed upload or creation leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from airun.errors import FinetuneMissingFilesError, FinetuneNotFoundError, InvalidAdapterError, InvalidRequestError
from airun.lora.adapter import (
    ADAPTER_FILES,
    CONFIG_FILE,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_RANK,
    MAX_CONFIG_BYTES,
    WEIGHTS_FILE,
    check_against_model,
    check_weights_header,
    read_adapter_config,
)
from airun.model.config import ModelConfig

META_FILE = "meta.json"
_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def default_data_dir() -> Path:
    """``$AIRUN_DATA_DIR``, else ``$XDG_DATA_HOME/airun``, else ``~/.local/share/airun``."""
    if os.environ.get("AIRUN_DATA_DIR"):
        return Path(os.environ["AIRUN_DATA_DIR"]).expanduser()
    if os.environ.get("XDG_DATA_HOME"):
        return Path(os.environ["XDG_DATA_HOME"]).expanduser() / "airun"
    return Path.home() / ".local" / "share" / "airun"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def check_name(name: object) -> str:
    """A fine-tune name: 1-128 of letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit, no ``..``."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidRequestError(
            f"invalid fine-tune name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit"
        )
    return name


@dataclass(slots=True)
class Finetune:
    """One registered fine-tune (the ``result`` object of the Workers AI fine-tune routes)."""

    id: str
    name: str
    model: str
    description: str
    public: bool
    created_at: str
    modified_at: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)


class FinetuneRegistry:
    """Fine-tunes under ``data_dir``; safe to share between processes (creation takes a file lock)."""

    def __init__(self, data_dir: Path | str, max_rank: int = DEFAULT_MAX_RANK, max_bytes: int = DEFAULT_MAX_BYTES):
        self.data_dir = Path(data_dir).expanduser()
        self.root = self.data_dir / "finetunes"
        self.max_rank = max_rank
        self.max_bytes = max_bytes

    # ---- paths ----------------------------------------------------------------------------------------------------
    def _root(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.root.is_symlink():
            raise InvalidRequestError(f"{self.root} must not be a symbolic link")
        return self.root

    def _dir(self, finetune_id: str) -> Path:
        """The folder of an existing fine-tune; FinetuneNotFoundError for anything else (bad id, symlink, missing)."""
        if not isinstance(finetune_id, str) or not _ID_RE.fullmatch(finetune_id):
            raise FinetuneNotFoundError(str(finetune_id))
        d = self.root / finetune_id
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            raise FinetuneNotFoundError(finetune_id) from None
        if not stat.S_ISDIR(st.st_mode) or d.resolve().parent != self.root.resolve():
            raise FinetuneNotFoundError(finetune_id)
        return d

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._root() / ".lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---- records --------------------------------------------------------------------------------------------------
    def _read_meta(self, d: Path) -> Finetune:
        data = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        return Finetune(**{k: data[k] for k in Finetune.__dataclass_fields__})

    def _write_meta(self, d: Path, ft: Finetune) -> None:
        tmp = d / f".{META_FILE}.{uuid.uuid4().hex}.part"
        tmp.write_text(json.dumps(ft.to_json(), indent=2), encoding="utf-8")
        os.replace(tmp, d / META_FILE)

    def list(self) -> list[Finetune]:
        """Every fine-tune, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for d in self.root.iterdir():
            if not _ID_RE.fullmatch(d.name) or d.is_symlink() or not d.is_dir():
                continue
            try:
                out.append(self._read_meta(d))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(out, key=lambda f: (f.created_at, f.id))

    def get(self, name_or_id: str) -> Finetune:
        """By id, else by name. Raises FinetuneNotFoundError."""
        if isinstance(name_or_id, str) and _ID_RE.fullmatch(name_or_id):
            with contextlib.suppress(FinetuneNotFoundError, OSError, ValueError, KeyError):
                return self._read_meta(self._dir(name_or_id))
        for ft in self.list():
            if ft.name == name_or_id:
                return ft
        raise FinetuneNotFoundError(str(name_or_id))

    def create(self, model: str, name: str, description: str = "", public: bool = False) -> Finetune:
        """Registers an empty fine-tune (its assets come with :meth:`put_asset`). Names are unique."""
        check_name(name)
        if not isinstance(model, str) or not model:
            raise InvalidRequestError("a fine-tune needs the model it adapts")
        if not isinstance(description, str) or not isinstance(public, bool):
            raise InvalidRequestError("description must be a string and public a boolean")
        with self._locked():  # one creation at a time: names stay unique and creation times increase
            now = _now()
            ft = Finetune(str(uuid.uuid4()), name, model, description, public, now, now)
            if any(f.name == name for f in self.list()):
                raise InvalidRequestError(f"a fine-tune named {name!r} already exists")
            tmp = self._root() / f".create-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                self._write_meta(tmp, ft)
                os.rename(tmp, self.root / ft.id)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return ft

    def delete(self, finetune_id: str) -> None:
        """Removes a fine-tune and its assets. Raises FinetuneNotFoundError."""
        d = self._dir(finetune_id)
        trash = self.root / f".delete-{uuid.uuid4().hex}"
        os.rename(d, trash)  # the id disappears at once; the files go after
        shutil.rmtree(trash, ignore_errors=True)

    # ---- assets ---------------------------------------------------------------------------------------------------
    def put_asset(
        self, finetune_id: str, file_name: str, src: BinaryIO | bytes, model: ModelConfig | None = None
    ) -> Finetune:
        """Stores one asset (``adapter_config.json`` or ``adapter_model.safetensors``) of a fine-tune, replacing any
        previous one. The file is validated on its own and, when the other asset is there and ``model`` is given,
        together with it against ``model``. Raises InvalidAdapterError / InvalidRequestError /
        FinetuneNotFoundError; on any failure nothing is left on disk."""
        if file_name not in ADAPTER_FILES:
            raise InvalidRequestError(f"file_name must be {CONFIG_FILE} or {WEIGHTS_FILE}, got {file_name!r}")
        d = self._dir(finetune_id)
        ft = self._read_meta(d)
        limit = MAX_CONFIG_BYTES if file_name == CONFIG_FILE else self.max_bytes
        tmp = d / f".upload-{uuid.uuid4().hex}.part"
        try:
            _copy_capped(src, tmp, limit, file_name)
            self._validate_pair(d, file_name, tmp, model)
            os.replace(tmp, d / file_name)
        finally:
            tmp.unlink(missing_ok=True)
        ft.modified_at = _now()
        self._write_meta(d, ft)
        return ft

    def _validate_pair(self, d: Path, file_name: str, new: Path, model: ModelConfig | None) -> None:
        cfg_path = new if file_name == CONFIG_FILE else d / CONFIG_FILE
        w_path = new if file_name == WEIGHTS_FILE else d / WEIGHTS_FILE
        config = read_adapter_config(cfg_path, self.max_rank) if cfg_path.exists() else None
        header = check_weights_header(w_path, self.max_bytes) if w_path.exists() else None
        if model is not None and config is not None and header is not None:
            check_against_model(config, header, model)

    def adapter_dir(self, name_or_id: str) -> Path:
        """The folder of a fine-tune that has both assets. Raises FinetuneNotFoundError / FinetuneMissingFilesError."""
        d = self._dir(self.get(name_or_id).id)
        for f in ADAPTER_FILES:
            try:
                st = os.lstat(d / f)
            except FileNotFoundError:
                raise FinetuneMissingFilesError() from None
            if not stat.S_ISREG(st.st_mode):
                raise FinetuneMissingFilesError()
        return d


def _copy_capped(src: BinaryIO | bytes, dst: Path, limit: int, what: str) -> None:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as out:
        if isinstance(src, (bytes, bytearray, memoryview)):
            if len(src) > limit:
                raise InvalidAdapterError(f"{what} is {len(src)} bytes; the limit is {limit}")
            out.write(src)
            return
        total = 0
        while chunk := src.read(1 << 20):
            total += len(chunk)
            if total > limit:
                raise InvalidAdapterError(f"{what} is larger than the limit of {limit} bytes")
            out.write(chunk)


def adapter_signature(path: Path) -> str:
    """A short digest of the adapter files' identity (inode, size, modification time): it changes when an asset is
    replaced, so an adapter's cache key changes with its content. Raises FinetuneMissingFilesError."""
    h = hashlib.sha256()
    for f in ADAPTER_FILES:
        try:
            st = os.stat(Path(path) / f)
        except (FileNotFoundError, NotADirectoryError):
            raise FinetuneMissingFilesError() from None
        h.update(f"{f}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


class AdapterResolver:
    """Turns a request's ``lora`` (an adapter named by ``--lora NAME=PATH``, else a fine-tune name or id) into its cache
    key and folder. The key is ``<name or fine-tune id>@<signature>``: one key per adapter content, whatever name the
    request used."""

    def __init__(self, modules: Mapping[str, str | Path], registry: FinetuneRegistry | None) -> None:
        self.modules = {k: Path(v).expanduser() for k, v in modules.items()}
        self.registry = registry

    def resolve(self, lora: str) -> tuple[str, Path]:
        """Raises FinetuneNotFoundError (3037) / FinetuneMissingFilesError (3039)."""
        if lora in self.modules:
            ident, path = lora, self.modules[lora]
        elif self.registry is not None:
            ft = self.registry.get(lora)
            ident, path = ft.id, self.registry.adapter_dir(ft.id)
        else:
            raise FinetuneNotFoundError(lora)
        return f"{ident}@{adapter_signature(path)}", path
