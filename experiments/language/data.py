"""WikiText raw text -> GPT-2 BPE tokens, cached on disk, and deterministic batches.

Where the text comes from, in this order:

1. a local directory holding the standard raw files `wiki.train.raw`, `wiki.valid.raw`,
   `wiki.test.raw` (`--data-dir=DIR` or the environment variable `REVDEQ_WIKITEXT_DIR`);
2. otherwise the Hugging Face hub (`Salesforce/wikitext`, config e.g. `wikitext-103-raw-v1`),
   through the `datasets` package (imported only on this path).

Two split layouts (`Config.splits`):

* `"standard"`: train on `wiki.train.raw`, validate on `wiki.valid.raw`, test on `wiki.test.raw`.
* `"valid-as-train"`: for machines that only have the validation and test files (the offline
  copy in `../shared/data/wikitext-2-raw` has no train split). Train on the head of
  `wiki.valid.raw`, validate on its held-out tail (`holdout_fraction` of its tokens, never
  trained on), test on `wiki.test.raw`.

The GPT-2 tokenizer (tiktoken `gpt2`) is built from `vocab.bpe` + `encoder.json` found in
`--tokenizer-dir` / `REVDEQ_TOKENIZER_DIR` / `../shared/data/gpt2` next to the repository, or
else downloaded by tiktoken the usual way. Token ids are < 50257; the model pads its vocabulary
to `PADDED_VOCAB_SIZE = 50304` (a multiple of 64, as nanoGPT), the extra rows never being a target.

Token arrays are cached as `.npy` files (uint16) under `cache_dir`, keyed by the text's sha256
and size and by the tokenizer, so a second run skips tokenisation.

Batches:

* training: `get_batch(tokens, step, ...)` draws `batch_size` random windows with a numpy
  generator seeded by `(seed, step)`: the same step always gives the same batch, so a resumed
  run sees exactly the batches it would have seen;
* evaluation: `eval_batches(tokens, ...)` cuts the split into contiguous non-overlapping windows;
  every token but the first is a target exactly once (the last window is padded and its padding
  has weight 0), so `sum(weight * nll) / sum(weight)` is the split's exact per-token loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np


GPT2_VOCAB_SIZE = 50257  # tiktoken "gpt2": 50256 BPE tokens + <|endoftext|>
PADDED_VOCAB_SIZE = 50304  # next multiple of 64
EOT_TOKEN = 50256

# sha256 that tiktoken itself checks for OpenAI's published GPT-2 files
# (tiktoken_ext/openai_public.py, gpt2()).
GPT2_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
TOKENIZER_ID = (
    "gpt2-" + hashlib.sha256("".join(sorted(GPT2_FILES.values())).encode()).hexdigest()[:8]
)

SPLIT_FILES = {
    "train": "wiki.train.raw",
    "valid": "wiki.valid.raw",
    "test": "wiki.test.raw",
}
HF_DATASET = "Salesforce/wikitext"
HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
SPLIT_LAYOUTS = ("standard", "valid-as-train")

_REPO_ROOT = Path(__file__).resolve().parents[2]
_HOW_TO_GET_WIKITEXT = (
    "Get WikiText raw files from https://huggingface.co/datasets/Salesforce/wikitext "
    "(or the official wikitext-2-raw-v1.zip / wikitext-103-raw-v1.zip) and pass their "
    "directory with --data-dir=DIR or REVDEQ_WIKITEXT_DIR=DIR; offline, "
    "../shared/data/wikitext-2-raw has wiki.valid.raw and wiki.test.raw "
    "(use --splits=valid-as-train there); with network and no --data-dir, "
    "`pip install datasets` downloads it."
)
_HOW_TO_GET_GPT2 = (
    f"Download vocab.bpe and encoder.json from {GPT2_URL} into a directory and pass it with "
    "--tokenizer-dir=DIR or REVDEQ_TOKENIZER_DIR=DIR (offline: ../shared/data/gpt2 holds them)."
)


class DataError(RuntimeError):
    """Missing or corrupt WikiText or tokenizer files. The message says what is wrong and how
    to get the files; entry points print it instead of a traceback."""


# ---------------------------------------------------------------------------------------------
# Tokenizer


def default_tokenizer_dir() -> Path | None:
    """`REVDEQ_TOKENIZER_DIR`, else `../shared/data/gpt2` next to the repository if present."""
    env = os.environ.get("REVDEQ_TOKENIZER_DIR")
    if env:
        return Path(env)
    for folder in _REPO_ROOT.parents:  # ../shared/data/gpt2, also from a nested worktree
        if (folder / "shared" / "data" / "gpt2").is_dir():
            return folder / "shared" / "data" / "gpt2"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_tokenizer(tokenizer_dir: str | Path | None = None):
    """The tiktoken `gpt2` Encoding.

    Built offline from `vocab.bpe` + `encoder.json` in `tokenizer_dir` (default:
    `default_tokenizer_dir()`); with no directory at all, `tiktoken.get_encoding("gpt2")`
    (which downloads and caches the files). Raises `DataError` for missing or corrupt files.
    """
    import tiktoken

    directory = Path(tokenizer_dir) if tokenizer_dir is not None else default_tokenizer_dir()
    if directory is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network, proxy, ...: one clear error instead
            raise DataError(
                f"could not load the GPT-2 tokenizer through tiktoken ({type(e).__name__}: {e}). "
                + _HOW_TO_GET_GPT2
            ) from None

    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    for name, expected in GPT2_FILES.items():
        path = directory / name
        if not path.is_file():
            raise DataError(f"GPT-2 tokenizer file {path} is missing. " + _HOW_TO_GET_GPT2)
        if _sha256(path) != expected:
            raise DataError(
                f"GPT-2 tokenizer file {path} is corrupt (sha256 differs from OpenAI's {expected}). "
                + _HOW_TO_GET_GPT2
            )
    ranks = data_gym_to_mergeable_bpe_ranks(
        str(directory / "vocab.bpe"),
        str(directory / "encoder.json"),
        vocab_bpe_hash=GPT2_FILES["vocab.bpe"],
        encoder_json_hash=GPT2_FILES["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


# ---------------------------------------------------------------------------------------------
# Raw text


def default_data_dir() -> Path | None:
    env = os.environ.get("REVDEQ_WIKITEXT_DIR")
    return Path(env) if env else None


def default_cache_dir() -> Path:
    return Path(os.environ.get("REVDEQ_CACHE_DIR", _REPO_ROOT / ".cache" / "wikitext"))


_HEADING = re.compile(r"^ = [^=].* = $")


def read_raw_file(path: Path) -> str:
    """Read and sanity-check one WikiText raw file (UTF-8, text, starts with an article heading)."""
    if not path.is_file():
        raise DataError(f"WikiText file {path} is missing. " + _HOW_TO_GET_WIKITEXT)
    data = path.read_bytes()
    problem = None
    if not data.strip():
        problem = "it is empty"
    elif b"\x00" in data:
        problem = "it contains NUL bytes (binary data, not text)"
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            problem = f"it is not valid UTF-8 (byte {e.start})"
        else:
            first = next((line for line in text.split("\n") if line.strip()), "")
            if not _HEADING.match(first):
                problem = f"its first line {first[:60]!r} is not a WikiText heading ' = Title = '"
    if problem is not None:
        raise DataError(f"WikiText file {path} is corrupt: {problem}. " + _HOW_TO_GET_WIKITEXT)
    return text


def _hub_text(config_name: str, split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "no --data-dir / REVDEQ_WIKITEXT_DIR given and the Hugging Face `datasets` package "
            "is not installed (`pip install datasets`). " + _HOW_TO_GET_WIKITEXT
        ) from None
    try:
        ds = datasets.load_dataset(HF_DATASET, config_name, split=HF_SPLITS[split])
    except Exception as e:
        raise DataError(
            f"could not load {HF_DATASET} ({config_name}, {split}) from the hub "
            f"({type(e).__name__}: {e}). " + _HOW_TO_GET_WIKITEXT
        ) from None
    # HF rows keep their trailing "\n"; joining gives the running text.
    return "".join(ds["text"])


# ---------------------------------------------------------------------------------------------
# Tokens (cached)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _load_cached(path: Path) -> np.ndarray | None:
    try:
        tokens = np.load(path, mmap_mode="r")
    except (OSError, ValueError):  # absent or unreadable: rebuild
        return None
    return tokens if tokens.dtype == np.uint16 and tokens.ndim == 1 else None


def encode(text: str, enc) -> np.ndarray:
    ids = enc.encode_ordinary(text)
    return np.asarray(ids, dtype=np.uint16)


def tokenize_file(path: Path, enc, cache_dir: Path | None) -> np.ndarray:
    """GPT-2 tokens of one raw file, as uint16; cached by (file sha256, size, tokenizer)."""
    if not path.is_file():
        raise DataError(f"WikiText file {path} is missing. " + _HOW_TO_GET_WIKITEXT)
    cache = None
    if cache_dir is not None:
        key = f"{path.name}-{_sha256(path)[:16]}-{path.stat().st_size}-{TOKENIZER_ID}.npy"
        cache = Path(cache_dir) / key
        tokens = _load_cached(cache)
        if tokens is not None:
            return tokens
    tokens = encode(read_raw_file(path), enc)
    if cache is not None:
        _atomic_save(cache, tokens)
    return tokens


def tokenize_hub_split(config_name: str, split: str, enc, cache_dir: Path | None) -> np.ndarray:
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"hf-{config_name}-{split}-{TOKENIZER_ID}.npy"
        tokens = _load_cached(cache)
        if tokens is not None:
            return tokens
    tokens = encode(_hub_text(config_name, split), enc)
    if cache is not None:
        _atomic_save(cache, tokens)
    return tokens


@dataclasses.dataclass(frozen=True)
class TokenSplits:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    description: str  # one line saying where each split comes from


def splits_for(config) -> TokenSplits:
    """`load_splits` with the data fields of an experiment `Config`."""
    return load_splits(
        data_dir=config.data_dir,
        hub_config=config.hub_config,
        splits=config.splits,
        holdout_fraction=config.holdout_fraction,
        tokenizer_dir=config.tokenizer_dir,
        cache_dir=config.cache_dir,
    )


def load_splits(
    *,
    data_dir: str | Path | None = None,
    hub_config: str = "wikitext-103-raw-v1",
    splits: str = "standard",
    holdout_fraction: float = 0.1,
    tokenizer_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> TokenSplits:
    """Token arrays for training, validation and test; see the module docstring."""
    if splits not in SPLIT_LAYOUTS:
        raise ValueError(f"splits={splits!r}; expected one of {SPLIT_LAYOUTS}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    if directory is not None and not directory.is_dir():
        raise DataError(f"WikiText directory {directory} does not exist. " + _HOW_TO_GET_WIKITEXT)
    needed = ("valid", "test") if splits == "valid-as-train" else ("train", "valid", "test")
    if directory is not None:
        missing = [SPLIT_FILES[s] for s in needed if not (directory / SPLIT_FILES[s]).is_file()]
        if missing:
            hint = ""
            if missing == ["wiki.train.raw"]:
                hint = " (only validation and test there? use --splits=valid-as-train)"
            raise DataError(
                f"WikiText file(s) {', '.join(missing)} missing in {directory}{hint}. "
                + _HOW_TO_GET_WIKITEXT
            )
    enc = load_tokenizer(tokenizer_dir)

    def tokens(split: str) -> np.ndarray:
        if directory is not None:
            return tokenize_file(directory / SPLIT_FILES[split], enc, cache)
        return tokenize_hub_split(hub_config, split, enc, cache)

    source = str(directory) if directory is not None else f"{HF_DATASET}:{hub_config}"
    if splits == "standard":
        return TokenSplits(
            train=tokens("train"),
            val=tokens("valid"),
            test=tokens("test"),
            description=f"{source}: train=wiki.train, val=wiki.valid, test=wiki.test",
        )
    valid = tokens("valid")
    n_val = int(round(holdout_fraction * len(valid)))
    if not 0 < n_val < len(valid):
        raise ValueError(f"holdout_fraction={holdout_fraction} leaves no train or val tokens")
    return TokenSplits(
        train=valid[:-n_val],
        val=valid[-n_val:],
        test=tokens("test"),
        description=(
            f"{source} (valid-as-train): train=first {len(valid) - n_val} tokens of wiki.valid, "
            f"val=held-out last {n_val} tokens of wiki.valid, test=wiki.test"
        ),
    )


# ---------------------------------------------------------------------------------------------
# Batches


def get_batch(
    tokens: np.ndarray, step: int, *, batch_size: int, seq_len: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`batch_size` random windows; the same `(seed, step)` always gives the same batch.

    Returns int32 `(inputs, targets)`, both `(batch_size, seq_len)`; targets are the inputs
    shifted by one token.
    """
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{len(tokens)} tokens cannot fill one window of {seq_len}+1")
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    windows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int32)
    return windows[:, :-1], windows[:, 1:]


def eval_windows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous non-overlapping windows covering the whole split.

    Window `i` has inputs `tokens[i*T : i*T+T]` and targets `tokens[i*T+1 : i*T+T+1]`, so
    every token except the first is a target exactly once. The last window is zero-padded;
    `weights` is 1.0 on real targets and 0.0 on padding. Shapes `(num_windows, seq_len)`.
    """
    num_targets = len(tokens) - 1
    num_windows = math.ceil(num_targets / seq_len)
    flat = np.zeros(num_windows * seq_len + 1, dtype=np.int32)
    flat[: len(tokens)] = tokens
    inputs = flat[:-1].reshape(num_windows, seq_len)
    targets = flat[1:].reshape(num_windows, seq_len)
    weights = (np.arange(num_windows * seq_len) < num_targets).astype(np.float32)
    return inputs, targets, weights.reshape(num_windows, seq_len)


def eval_batches(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, max_tokens: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`eval_windows` grouped into fixed-shape batches `(inputs, targets, weights)`.

    The last batch is filled with zero-weight windows, so every batch has the same shape
    (one compilation). `max_tokens` evaluates only the first `max_tokens` tokens (None: all).
    """
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    inputs, targets, weights = eval_windows(tokens, seq_len)
    for start in range(0, len(inputs), batch_size):
        x, y, w = (a[start : start + batch_size] for a in (inputs, targets, weights))
        pad = batch_size - len(x)
        if pad:
            x, y, w = (np.concatenate([a, np.zeros((pad, seq_len), a.dtype)]) for a in (x, y, w))
        yield x, y, w


def unigram_perplexity(train: np.ndarray, evaluate: np.ndarray) -> dict[str, float]:
    """Unigram baselines on the targets of `evaluate` (every token but its first).

    `fitted`: add-one-smoothed unigram frequencies of `train` (over the 50257 GPT-2 tokens).
    `oracle`: the eval split's own unigram frequencies: no unigram model does better.
    """
    targets = np.asarray(evaluate[1:], dtype=np.int64)
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=GPT2_VOCAB_SIZE) + 1.0
    log_p = np.log(counts / counts.sum())
    fitted = float(np.exp(-log_p[targets].mean()))
    own = np.bincount(targets, minlength=GPT2_VOCAB_SIZE).astype(np.float64)
    p = own[own > 0] / own.sum()
    oracle = float(np.exp(-(p * np.log(p)).sum()))
    return {"fitted": fitted, "oracle": oracle}
