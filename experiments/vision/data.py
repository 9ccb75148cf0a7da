"""CIFAR-10 data: readers, download, normalisation, augmentation and deterministic batches.

Three on-disk forms are read, all into the same `CIFAR10` container (uint8 HWC images):

* the official python-format archive `cifar-10-python.tar.gz` (read in place, no extraction),
  or its extracted folder `cifar-10-batches-py/` (`data_batch_1..5`, `test_batch`);
* the compact real sample `cifar10_train_10k_jpeg.npz` + `cifar10_test_5k_jpeg.npz`
  (`../shared/data/cifar10-sample/` next to the repository; 10k train / 5k test, JPEG-decoded).

Where the data is looked for (`load_cifar10`): `--data-dir` (config `data_dir`), else the
environment variable `REVDEQ_CIFAR_DIR`, else the shared sample next to the repository, else a
previous download in `~/.cache/revdeq_jax/cifar10`; if none of these exists and
`download=True`, the official archive is downloaded there and its md5 checked. A folder given
with `--data-dir` is only read, never downloaded into. Anything missing or unreadable raises
`CIFAR10DataError`, whose message names the file and how to get it.

The official batches are Python pickles. They are read with a restricted unpickler that only
accepts the numpy reconstruction helpers the official files use, so a tampered file cannot run
code; no other file in this project is unpickled.

Augmentation (random crop with 4-pixel zero padding, horizontal flip) and normalisation are
pure JAX functions of a PRNG key, meant to run inside the jitted train step.
"""

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, Shaped


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
SAMPLE_TRAIN = "cifar10_train_10k_jpeg.npz"
SAMPLE_TEST = "cifar10_test_5k_jpeg.npz"
ENV_VAR = "REVDEQ_CIFAR_DIR"
CACHE_DIR = Path("~/.cache/revdeq_jax/cifar10").expanduser()
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)  # HWC as stored
LABEL_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# Per-channel statistics of the 50k official training images (pixel units, RGB).
MEAN = (125.307, 122.950, 113.865)
STD = (62.993, 62.089, 66.705)

_HOW_TO_GET = (
    f"Get the official archive from {CIFAR10_URL} (md5 {CIFAR10_MD5}) and pass its folder "
    f"with `--data-dir=DIR` or `{ENV_VAR}=DIR` (either `{ARCHIVE_NAME}` or the extracted "
    f"`{BATCHES_DIR}/`), run with `--download=true` on a connected machine, or use the "
    f"compact sample ({SAMPLE_TRAIN} + {SAMPLE_TEST}, see ../shared/data/cifar10-sample/)."
)


class CIFAR10DataError(Exception):
    """CIFAR-10 files are missing, incomplete or corrupt; the message says which and how to
    get them."""


@dataclasses.dataclass(frozen=True)
class CIFAR10:
    """CIFAR-10 in memory (host numpy arrays).

    - `x_train`, `x_test`: uint8 `(N, 32, 32, 3)`, HWC RGB.
    - `y_train`, `y_test`: int32 `(N,)`, in `0..9`.
    - `source`: where it was read from (for logs and checkpoint headers).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """`(x_test, y_test)`."""
        return self.x_test, self.y_test

    def take(self, train: int | None = None, test: int | None = None) -> "CIFAR10":
        """The first `train`/`test` examples (None: all)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train[:train],
            y_train=self.y_train[:train],
            x_test=self.x_test[:test],
            y_test=self.y_test[:test],
        )


# ----------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------


class _BatchUnpickler(pickle.Unpickler):
    """Accepts only what an official CIFAR-10 batch pickle contains: a dict of lists, bytes
    and numpy arrays. Anything else (e.g. `os.system`) is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR-10 batch")


def _parse_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One official batch (pickled dict with b"data" (N, 3072) uint8 CHW and b"labels")."""
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CIFAR10DataError(
            f"{where} is corrupt: it is not a readable CIFAR-10 batch pickle "
            f"({type(e).__name__}: {e}). Delete it and get it again. {_HOW_TO_GET}"
        ) from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise CIFAR10DataError(
            f'{where} is corrupt: expected a dict with keys b"data" and b"labels", got {keys}. '
            + _HOW_TO_GET
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CIFAR10DataError(
            f"{where} is corrupt: b'data' should be uint8 (N, 3072), got "
            f"{data.dtype} {data.shape}. " + _HOW_TO_GET
        )
    if (
        labels.shape != (data.shape[0],)
        or labels.min(initial=0) < 0
        or labels.max(initial=0) >= NUM_CLASSES
    ):
        raise CIFAR10DataError(
            f"{where} is corrupt: b'labels' should be {data.shape[0]} integers in 0..9, got "
            f"shape {labels.shape}. " + _HOW_TO_GET
        )
    # Rows are 1024 red, then green, then blue values, each row-major: CHW -> HWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def _concat(
    parts: Iterable[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*parts)
    return np.concatenate(xs), np.concatenate(ys)


def read_archive(path: str | os.PathLike) -> CIFAR10:
    """Read the official `cifar-10-python.tar.gz` in place (no extraction)."""
    path = Path(path)
    if not path.is_file():
        raise CIFAR10DataError(f"CIFAR-10 archive not found: {path}. " + _HOW_TO_GET)
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if n not in members]
            if missing:
                raise CIFAR10DataError(
                    f"{path} is incomplete: missing {', '.join(missing)} "
                    f"(expected {BATCHES_DIR}/data_batch_1..5 and test_batch). " + _HOW_TO_GET
                )

            def _read(name):
                f = tar.extractfile(members[name])
                assert f is not None
                return _parse_batch(f.read(), f"{path}:{members[name].name}")

            train = _concat(_read(n) for n in TRAIN_BATCHES)
            test = _read(TEST_BATCH)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise CIFAR10DataError(
            f"{path} is corrupt: not a readable .tar.gz ({type(e).__name__}: {e}). "
            "Delete it and download it again. " + _HOW_TO_GET
        ) from e
    return CIFAR10(*train, *test, source=str(path))


def read_batches_dir(path: str | os.PathLike) -> CIFAR10:
    """Read an extracted `cifar-10-batches-py/` folder."""
    path = Path(path)
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if not (path / n).is_file()]
    if missing:
        raise CIFAR10DataError(
            f"{path} is incomplete: missing {', '.join(missing)}. " + _HOW_TO_GET
        )
    train = _concat(_parse_batch((path / n).read_bytes(), str(path / n)) for n in TRAIN_BATCHES)
    test = _parse_batch((path / TEST_BATCH).read_bytes(), str(path / TEST_BATCH))
    return CIFAR10(*train, *test, source=str(path))


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise CIFAR10DataError(f"CIFAR-10 sample file not found: {path}. " + _HOW_TO_GET)
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as d:
            x, y = np.asarray(d["x"]), np.asarray(d["y"])
    except Exception as e:  # noqa: BLE001 - zip/npy/key errors all mean a bad file
        raise CIFAR10DataError(
            f"{path} is corrupt: not a readable .npz with arrays `x` and `y` "
            f"({type(e).__name__}: {e}). " + _HOW_TO_GET
        ) from e
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE or y.shape != x.shape[:1]:
        raise CIFAR10DataError(
            f"{path} is corrupt: expected x uint8 (N, 32, 32, 3) and y (N,), got "
            f"x {x.dtype} {x.shape}, y {y.shape}. " + _HOW_TO_GET
        )
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise CIFAR10DataError(f"{path} is corrupt: labels outside 0..9. " + _HOW_TO_GET)
    return x, y.astype(np.int32)


def read_sample(path: str | os.PathLike) -> CIFAR10:
    """Read the compact sample (`cifar10_train_10k_jpeg.npz`, `cifar10_test_5k_jpeg.npz`)."""
    path = Path(path)
    return CIFAR10(
        *_read_npz(path / SAMPLE_TRAIN),
        *_read_npz(path / SAMPLE_TEST),
        source=str(path),
    )


# ----------------------------------------------------------------------------------------
# Download and discovery
# ----------------------------------------------------------------------------------------


def file_md5(path: str | os.PathLike) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_cifar10(
    dest_dir: str | os.PathLike = CACHE_DIR,
    *,
    url: str = CIFAR10_URL,
    md5: str = CIFAR10_MD5,
) -> Path:
    """Download the official archive into `dest_dir` (atomically; md5 checked) and return its
    path. An existing file with the right md5 is reused."""
    dest_dir = Path(dest_dir)
    dest = dest_dir / ARCHIVE_NAME
    if dest.is_file() and file_md5(dest) == md5:
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".download-", suffix=".tar.gz")
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=60) as resp,
        ):
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
        got = file_md5(tmp)
        if got != md5:
            raise CIFAR10DataError(
                f"download from {url} has md5 {got}, expected {md5}; not using it. " + _HOW_TO_GET
            )
        os.replace(tmp, dest)
    except OSError as e:  # URLError is an OSError
        raise CIFAR10DataError(
            f"could not download CIFAR-10 from {url} ({type(e).__name__}: {e}). " + _HOW_TO_GET
        ) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def default_sample_dir() -> Path:
    """`shared/data/cifar10-sample` in the nearest folder above the repository holding one
    (`../shared/data/cifar10-sample` for a checkout beside `shared/`)."""
    repo_root = Path(__file__).resolve().parents[2]
    for folder in repo_root.parents:
        if (folder / "shared" / "data" / "cifar10-sample").is_dir():
            return folder / "shared" / "data" / "cifar10-sample"
    return repo_root.parent / "shared" / "data" / "cifar10-sample"


def _read_dir(path: Path) -> CIFAR10 | None:
    """Whatever CIFAR-10 form `path` holds, or None if it holds none."""
    if path.is_file():
        return read_archive(path)
    if (path / BATCHES_DIR).is_dir():
        return read_batches_dir(path / BATCHES_DIR)
    if any((path / n).exists() for n in (*TRAIN_BATCHES, TEST_BATCH)):
        return read_batches_dir(path)
    if (path / ARCHIVE_NAME).exists():
        return read_archive(path / ARCHIVE_NAME)
    if (path / SAMPLE_TRAIN).exists() or (path / SAMPLE_TEST).exists():
        return read_sample(path)
    return None


def load_cifar10(data_dir: str | os.PathLike | None = None, *, download: bool = False) -> CIFAR10:
    """Find and read CIFAR-10 (see the module docstring for the search order).

    **Arguments:**

    - `data_dir`: a folder holding `cifar-10-python.tar.gz`, `cifar-10-batches-py/`, the batch
      files themselves or the npz sample; or the archive's path. Empty/None: use `$REVDEQ_CIFAR_DIR`,
      then the shared sample, then the download cache.
    - `download`: download the official archive into the cache when no folder is given
      and nothing is found (a folder that is given is never downloaded into).
    """
    explicit = data_dir or os.environ.get(ENV_VAR) or None
    if explicit:  # a folder the user named: read it or say what is wrong; never download
        path = Path(explicit).expanduser()
        if not path.exists():
            raise CIFAR10DataError(f"CIFAR-10 data folder not found: {path}. " + _HOW_TO_GET)
        data = _read_dir(path)
        if data is not None:
            return data
        raise CIFAR10DataError(
            f"no CIFAR-10 data in {path}: looked for {ARCHIVE_NAME}, {BATCHES_DIR}/, "
            f"data_batch_1..5 + test_batch, and {SAMPLE_TRAIN} + {SAMPLE_TEST}. " + _HOW_TO_GET
        )
    for candidate in (default_sample_dir(), CACHE_DIR):
        if candidate.is_dir():
            data = _read_dir(candidate)
            if data is not None:
                return data
    if download:
        return read_archive(download_cifar10(CACHE_DIR))
    raise CIFAR10DataError(
        f"no CIFAR-10 data found (no --data-dir, ${ENV_VAR} unset, no sample at "
        f"{default_sample_dir()}, nothing in {CACHE_DIR}). " + _HOW_TO_GET
    )


# ----------------------------------------------------------------------------------------
# On-device preprocessing (pure JAX; runs inside the jitted step)
# ----------------------------------------------------------------------------------------


def normalise(images: Shaped[Array, "batch 32 32 3"]) -> Float[Array, "batch 3 32 32"]:
    """uint8/float HWC pixels -> per-channel standardised float32 CHW (the models' layout)."""
    x = images.astype(jnp.float32)
    mean = jnp.asarray(MEAN, jnp.float32).reshape(1, 1, 1, 3)
    std = jnp.asarray(STD, jnp.float32).reshape(1, 1, 1, 3)
    x = (x - mean) / std
    return jnp.transpose(x, (0, 3, 1, 2))


def augment(
    key: PRNGKeyArray, images: Shaped[Array, "batch h w c"], *, padding: int = 4
) -> Shaped[Array, "batch h w c"]:
    """Random crop after zero padding by `padding` pixels, and a random horizontal flip, per
    image (HWC). Deterministic given `key`; same dtype and shape out as in."""
    b, h, w, c = images.shape
    crop_key, flip_key = jr.split(key)
    offsets = jr.randint(crop_key, (b, 2), 0, 2 * padding + 1)
    flips = jr.bernoulli(flip_key, 0.5, (b,))
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def _one(image, offset, flip):
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(_one)(padded, offsets, flips)


# ----------------------------------------------------------------------------------------
# Deterministic batches
# ----------------------------------------------------------------------------------------


class Batches:
    """Batch `step` of an epoch-wise shuffled pass: epoch `e` uses a fixed permutation drawn
    from `(seed, e)`, so `get(step)` depends only on `step` (exact resume). The incomplete last
    batch of an epoch is dropped."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
        if batch_size > len(images):
            raise ValueError(
                f"`batch_size`={batch_size} is larger than the training set ({len(images)})."
            )
        self.images, self.labels = images, labels
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = len(images) // batch_size
        self._epoch, self._perm = -1, np.arange(0)

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(int(step), self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]

    def get(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices(step)
        return {"image": self.images[idx], "label": self.labels[idx]}


def eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterable[tuple[np.ndarray, np.ndarray, int]]:
    """Fixed-size evaluation batches `(images, labels, n_valid)`: the last one is padded by
    repeating its first row so every batch has one shape (one compilation)."""
    n = len(images)
    for start in range(0, n, batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        valid = len(x)
        if valid < batch_size:
            pad = batch_size - valid
            x = np.concatenate([x, np.repeat(x[:1], pad, axis=0)])
            y = np.concatenate([y, np.repeat(y[:1], pad, axis=0)])
        yield x, y, valid


__all__ = [
    "CIFAR10",
    "CIFAR10DataError",
    "Batches",
    "augment",
    "download_cifar10",
    "eval_batches",
    "load_cifar10",
    "normalise",
    "read_archive",
    "read_batches_dir",
    "read_sample",
]
