"""CIFAR-10's python archive, read from the tar without extracting it (no pickle code runs)."""

from __future__ import annotations

import codecs
import io
import logging
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from numpy.typing import NDArray

from docl_flower.core.common.checks import check_flag, check_path_text, check_sha256_text
from docl_flower.core.common.files import file_sha256
from docl_flower.core.data.base import LOADER_VERSION, DataError, Split, check_split, content_digest

log = logging.getLogger(__name__)


#: SHA-256 of the official ``cifar-10-python.tar.gz`` (md5 c58f30108f718f92721af3b95e74349a,
#: the value torchvision checks; this SHA-256 is the one Keras's ``cifar10.load_data`` checks).
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"

#: The pickle batches of CIFAR-10's python archive, per split.
CIFAR10_BATCHES: dict[Split, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}


# ---------------------------------------------------------------------------- CIFAR-10


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes use it (latin-1 only)."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"encoding {encoding!r} is not allowed in a CIFAR-10 batch")
    return codecs.encode(text, "latin1")


def _pickle_globals() -> dict[tuple[str, str], object]:
    sample = np.zeros(1, np.uint8)
    reconstruct = sample.__reduce__()[0]
    frombuffer = sample.__reduce_ex__(5)[0]
    table: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for prefix in ("numpy.core", "numpy._core"):
        table[(f"{prefix}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{prefix}.numeric", "_frombuffer")] = frombuffer
    return table


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch: numpy arrays, lists and dicts; no other global is resolved."""

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global; refuse every other."""
        found = _pickle_globals().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return found


def _parse_cifar_batch(raw: bytes, where: str) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # a corrupt or hostile pickle: refuse it whatever the reason
        raise DataError(f"{where}: not a CIFAR-10 batch ({err})") from err
    if not isinstance(batch, dict):
        raise DataError(f"{where}: not a CIFAR-10 batch (a {type(batch).__name__})")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3 * 32 * 32
    ):
        raise DataError(
            f"{where}: data must be uint8 (n, 3072), got {getattr(data, 'shape', data)!r}"
        )
    if not isinstance(labels, list | np.ndarray):
        raise DataError(f"{where}: labels must be a list, got {type(labels).__name__}")
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as err:
        raise DataError(f"{where}: labels are not integers ({err})") from err
    if label_array.shape != (data.shape[0],) or not ((label_array >= 0) & (label_array < 10)).all():
        raise DataError(f"{where}: need {data.shape[0]} labels in 0..9, got {label_array.shape}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel planes -> HWC
    return np.ascontiguousarray(images), label_array


@dataclass(frozen=True)
class Cifar10Dataset:
    """CIFAR-10 (32x32 RGB, 10 classes) from its python archive, read without extracting it.

    Parameters
    ----------
    root : str
        Folder that holds ``filename`` (a download goes here).
    sha256 : str
        Expected SHA-256 of the archive; the default is the official archive's.
    download : bool
        Download a missing archive through torchvision when a network is up.
    filename : str
        The archive's name in ``root``.
    """

    root: str
    sha256: str = CIFAR10_SHA256
    download: bool = True
    filename: str = "cifar-10-python.tar.gz"

    def __post_init__(self) -> None:
        check_path_text("root", self.root)
        object.__setattr__(self, "sha256", check_sha256_text("sha256", self.sha256))
        check_flag("download", self.download)
        name = self.filename
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise ValueError(f"filename must be a file name, got {name!r}")

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(32, 32, 3)``."""
        return (32, 32, 3)

    def check(self, split: Split) -> None:
        """The archive is present (downloaded when allowed) and passes its SHA-256 check."""
        check_split(split)
        self.path()

    def path(self) -> Path:
        """The archive, downloaded when missing (and allowed), after its SHA-256 check."""
        root = Path(self.root).expanduser()
        path = root / self.filename
        if not path.is_file():
            how = (
                f"copy the official cifar-10-python.tar.gz (SHA-256 {CIFAR10_SHA256}) into {root} "
                f"as {self.filename}, or set download: true and run once with a network "
                "(torchvision downloads it)"
            )
            if not self.download:
                raise DataError(f"{path} is missing (downloads are disabled): {how}")
            log.warning("%s is missing: downloading it through torchvision", path)
            try:
                from torchvision.datasets import CIFAR10
                from torchvision.datasets.utils import download_url

                root.mkdir(parents=True, exist_ok=True)
                download_url(CIFAR10.url, str(root), filename=self.filename, md5=CIFAR10.tgz_md5)
            except Exception as err:
                raise DataError(
                    f"{path} is missing and the download failed ({err}): {how}"
                ) from err
        actual = file_sha256(path)
        if actual != self.sha256:
            raise DataError(
                f"{path} fails its SHA-256 check (expected {self.sha256}, got {actual}); delete "
                "it and copy or download the archive again, or set dataset.sha256 to your copy's"
            )
        return path

    def load(self, split: Split) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
        """Return ``(images (n, 32, 32, 3) uint8 RGB, labels (n,) int64 in 0..9)``."""
        wanted = CIFAR10_BATCHES[check_split(split)]
        path = self.path()
        found: dict[str, tuple[NDArray[np.uint8], NDArray[np.int64]]] = {}
        try:
            with tarfile.open(path, "r:gz") as tar:
                for member in tar:
                    base = PurePosixPath(member.name).name
                    if not member.isfile() or base not in wanted or base in found:
                        continue
                    handle = tar.extractfile(member)
                    if handle is None:
                        continue
                    found[base] = _parse_cifar_batch(handle.read(), f"{path}:{member.name}")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path} is not a readable tar.gz archive ({err})") from err
        missing = [b for b in wanted if b not in found]
        if missing:
            raise DataError(f"{path} lacks the CIFAR-10 batch(es) {missing}")
        images = np.concatenate([found[b][0] for b in wanted])
        labels = np.concatenate([found[b][1] for b in wanted])
        return images, labels

    def fingerprint(self) -> str:
        """The archive's expected SHA-256 identifies both splits (``load`` checks it)."""
        return content_digest(
            {"loader": "cifar10-python", "version": LOADER_VERSION, "sha256": self.sha256}
        )
