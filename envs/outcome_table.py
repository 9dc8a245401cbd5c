"""Outcome tables: what every configuration of the frozen backbone does on every input of a split.

Because the backbone is frozen, an env step is an array look-up. A table is cached
on disk under a key made of the backbone's content hash, the split's name and
contents, and the feature spec, so a stale table is never used.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from backbone import AdaPerceiver, flops_grid
from backbone.distributed import current_context
from backbone.folders import ImageFiles, image_batches
from backbone.grid import GridPoint
from backbone.io import atomic_write
from envs.features import FeatureSpec, features_from, staged_flops

FORMAT_VERSION = 4  # 3: predicted classes, staged FLOPs of the glance cascade; 4: a digest of the arrays


@dataclass
class OutcomeTable:
    """Outcomes of every configuration ``(K, L, M)`` = (tokens, depth, width) on ``n`` inputs."""

    features: np.ndarray
    """Policy features ``(n, F)`` float32."""
    predicted: np.ndarray
    """Top-1 predicted class ``(n, K, L, M)`` int16."""
    true_logprob: np.ndarray
    """Log-probability of the true class ``(n, K, L, M)`` float32."""
    confidence: np.ndarray
    """Max softmax probability ``(n, K, L, M)`` float32 (for confidence early exit)."""
    labels: np.ndarray
    """True classes ``(n,)`` int64."""
    flops: np.ndarray
    """Backbone FLOPs per image of a fresh pass at every configuration ``(K, L, M)`` int64."""
    staged_flops: np.ndarray
    """Backbone FLOPs per image ``(K, L, M)`` int64 of the policy's features and then each configuration,
    as a policy pays them (the glance's own point costs the glance alone; see ``envs.features.staged_flops``)."""
    token_grans: tuple[int, ...]
    ffn_widths: tuple[float, ...]
    meta: dict
    """Cache key parts: backbone hash, split, feature spec."""

    def __len__(self) -> int:
        return len(self.labels)

    @cached_property
    def correct(self) -> np.ndarray:
        """Top-1 correctness ``(n, K, L, M)`` bool."""
        return self.predicted == self.labels[:, None, None, None]

    @cached_property
    def agree(self) -> np.ndarray:
        """``(n, K, L, M)`` bool: the configuration predicts what the full configuration predicts."""
        return self.predicted == self.predicted[:, -1:, -1:, -1:]

    def subset(self, rows: np.ndarray) -> OutcomeTable:
        """The table of the inputs ``rows`` only (e.g. one half of a split, for cross-fitting)."""
        per_input = {key: getattr(self, key)[rows] for key in PER_INPUT}
        return OutcomeTable(**per_input, **{key: getattr(self, key) for key in SHARED})

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(self.predicted.shape[1:])

    @property
    def full_flops(self) -> int:
        return int(self.flops[-1, -1, -1])

    def predictions(self, actions: np.ndarray) -> np.ndarray:
        """Predicted classes ``(n,)`` of one action ``(k, l, m)`` per input, ``actions`` ``(n, 3)``."""
        k, l, m = np.asarray(actions, dtype=np.int64).T
        return self.predicted[np.arange(len(self)), k, l, m]

    def configuration(self, action) -> GridPoint:
        """The grid point of an action ``(k, l, m)``."""
        return GridPoint.from_action(action, self.token_grans, self.ffn_widths)


PER_INPUT = ("features", "predicted", "true_logprob", "confidence", "labels")
SHARED = ("flops", "staged_flops", "token_grans", "ffn_widths", "meta")


def _split_key(images: torch.Tensor | ImageFiles, labels: torch.Tensor) -> str:
    # image files by what they are (names, size, channels, resize), never by reading every file
    digest = hashlib.sha256(images.key().encode() if isinstance(images, ImageFiles) else images.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return digest.hexdigest()[:16]


def build_outcome_table(
    model: AdaPerceiver, images: torch.Tensor | ImageFiles, labels: torch.Tensor, spec: FeatureSpec,
    batch_size: int = 512, meta: dict | None = None, progress: bool = False,
) -> OutcomeTable:
    """Run the backbone once per width (a grid pass) over ``images`` ``(n, C, H, W)``: in memory, or image files
    read batch by batch (only the table's rows accumulate)."""
    model.eval()
    device = next(model.parameters()).device
    glance = spec.glance_config(model.config)
    parts: dict[str, list] = {"features": [], "predicted": [], "true_logprob": [], "confidence": []}
    with torch.inference_mode():
        grid = int(np.prod(model.config.grid_shape))
        desc = f"tabulating {(meta or {}).get('split', 'inputs')} ({len(images)} images x {grid} configurations)"
        batches = zip(range(0, len(images), batch_size), image_batches(images, batch_size), strict=True)
        for start, batch in tqdm(batches, total=-(-len(images) // batch_size), desc=desc, unit="batch",
                                 disable=not progress):
            x = batch.to(device)
            y = labels[start : start + batch_size].to(device)
            input_tokens = model.embed(x)
            kv = model.read_kv(input_tokens)
            logits = torch.stack([model.run_grid(input_tokens, w, kv) for w in model.config.ffn_widths], dim=3).float()
            logprobs = logits.log_softmax(-1)  # (B, K, L, M, C)
            k, l, m = model.config.token_index(glance[0]), glance[1] - 1, model.config.width_index(glance[2])
            parts["features"].append(features_from(input_tokens, logits[:, k, l, m] if spec.glance else None, spec).cpu())
            parts["predicted"].append(logits.argmax(-1).to(torch.int16).cpu())
            parts["true_logprob"].append(logprobs.gather(-1, y[:, None, None, None, None].expand(*logprobs.shape[:-1], 1))[..., 0].cpu())
            parts["confidence"].append(logprobs.amax(-1).exp().cpu())
    arrays = {key: torch.cat(value).numpy() for key, value in parts.items()}
    c = model.config
    return OutcomeTable(
        features=arrays["features"].astype(np.float32),
        predicted=arrays["predicted"].astype(np.int16),
        true_logprob=arrays["true_logprob"].astype(np.float32),
        confidence=arrays["confidence"].astype(np.float32),
        labels=labels.numpy().astype(np.int64),
        flops=flops_grid(c).numpy(),
        staged_flops=staged_flops(spec, c),
        token_grans=c.token_grans,
        ffn_widths=c.ffn_widths,
        meta=meta or {},
    )


ARRAYS = (*PER_INPUT, "flops", "staged_flops")


def _digest_label(key: str, dtype: np.dtype, shape: tuple) -> bytes:
    """What the digest reads of an array before its bytes: its name, dtype and shape."""
    return f"{key}:{dtype.str}:{tuple(shape)}".encode()


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays' names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for key in ARRAYS:
        value = np.ascontiguousarray(arrays[key])
        digest.update(_digest_label(key, value.dtype, value.shape))
        # the bytes as a view, not a copy (``tobytes``): a memory-mapped table of millions of rows is hashed
        # from its file pages, never held in memory twice
        digest.update(value.reshape(-1).view(np.uint8))
    return digest.hexdigest()


class TableError(ValueError):
    """An outcome table file that cannot be read or does not verify."""


def save_table(table: OutcomeTable, path: str | Path) -> None:
    """Write ``table`` to an ``.npz`` (plain arrays, metadata and the arrays' digest as JSON text), atomically."""
    save_concatenated([table], path)


def save_concatenated(parts: list[OutcomeTable], path: str | Path, chunk_bytes: int = 1 << 26) -> None:
    """Write the row slices ``parts`` of one split, in order, as one table file (what ``save_table`` writes for
    their concatenation), atomically. Rows are copied ``chunk_bytes`` at a time, so parts that are memory-mapped
    shards of a table larger than memory are merged in bounded memory."""
    first = parts[0]

    def write(tmp: str) -> None:
        digest = hashlib.sha256()  # the digest ``arrays_digest`` gives the concatenated arrays, fed slice by slice
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key in ARRAYS:
                values = [getattr(p, key) for p in parts] if key in PER_INPUT else [getattr(first, key)]
                if len({(v.dtype.str, v.shape[1:]) for v in values}) != 1:
                    raise TableError(f"the parts' {key} arrays differ in dtype or row shape")
                shape = (sum(len(v) for v in values), *values[0].shape[1:])
                digest.update(_digest_label(key, values[0].dtype, shape))
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_2_0(member, {
                        "descr": np.lib.format.dtype_to_descr(values[0].dtype), "fortran_order": False, "shape": shape})
                    for value in values:
                        step = max(1, chunk_bytes // max(1, value[:1].nbytes))
                        for start in range(0, len(value), step):
                            chunk = np.ascontiguousarray(value[start : start + step]).reshape(-1).view(np.uint8)
                            digest.update(chunk)
                            member.write(chunk)
            header = json.dumps({
                "format": FORMAT_VERSION,
                "token_grans": list(first.token_grans),
                "ffn_widths": list(first.ffn_widths),
                "meta": first.meta,
                "digest": digest.hexdigest(),
            })
            with archive.open("header.npy", "w") as member:
                np.lib.format.write_array(member, np.array(header))

    atomic_write(Path(path), write)


def _mmap_members(path: str | Path, names: tuple[str, ...]) -> dict[str, np.memmap]:
    """Read-only memory maps of the ``.npy`` members ``names`` of an uncompressed ``.npz`` (``np.savez`` stores its
    members uncompressed; ``np.load``'s ``mmap_mode`` maps only plain ``.npy`` files, so the members' offsets are
    read from the zip's local headers here)."""
    out = {}
    with open(path, "rb") as raw, zipfile.ZipFile(raw) as archive:
        for name in names:
            info = archive.getinfo(f"{name}.npy")
            if info.compress_type != zipfile.ZIP_STORED:
                raise TableError(f"member {name} is compressed and cannot be memory-mapped; write it with save_table")
            raw.seek(info.header_offset)
            local = raw.read(30)  # a zip local file header: its name and extra field lengths are at bytes 26..29
            raw.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little"))
            version = np.lib.format.read_magic(raw)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise TableError(f"member {name} has .npy format {version}, which cannot be memory-mapped here")
            shape, fortran, dtype = read_header[version](raw)
            order = "F" if fortran else "C"
            out[name] = np.memmap(raw.name, dtype=dtype, mode="r", offset=raw.tell(), shape=shape, order=order)
    return out


def load_table(path: str | Path, mmap: bool = False) -> OutcomeTable:
    """Read a table written by ``save_table`` (no pickle) and verify its digest; ``TableError`` on any failure.

    ``mmap``: its arrays are read-only memory maps of the file, read page by page as the env indexes them, so a
    table larger than memory can be stepped (an env step touches a few rows); the digest still reads every byte once.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            header = json.loads(str(f["header"]))
            arrays = _mmap_members(path, ARRAYS) if mmap else {key: f[key] for key in ARRAYS}
        if header.get("format") != FORMAT_VERSION:
            raise TableError(f"format {header.get('format')}, expected {FORMAT_VERSION}")
        if header.get("digest") != arrays_digest(arrays):
            raise TableError("its arrays do not match the digest they were written with")
        return OutcomeTable(**arrays, token_grans=tuple(header["token_grans"]), ffn_widths=tuple(header["ffn_widths"]),
                            meta=header["meta"])
    except TableError as err:
        raise TableError(f"{path}: {err}") from err
    except Exception as err:  # zip, npy, JSON and key errors of a damaged file all mean the same here
        raise TableError(f"{path}: unreadable outcome table ({type(err).__name__}: {err})") from err


def check_table(table: OutcomeTable, labels: torch.Tensor, grid_shape: tuple[int, int, int], n_features: int) -> None:
    """Refuse a table that does not describe these inputs and this grid (``TableError``)."""
    n = len(labels)
    if table.predicted.shape != (n, *grid_shape) or table.flops.shape != grid_shape:
        raise TableError(f"shapes {table.predicted.shape}, expected {(n, *grid_shape)}")
    for key in ("true_logprob", "confidence"):
        if getattr(table, key).shape != (n, *grid_shape):
            raise TableError(f"{key} has shape {getattr(table, key).shape}, expected {(n, *grid_shape)}")
    if table.features.shape != (n, n_features) or not np.isfinite(table.features).all():
        raise TableError(f"features of shape {table.features.shape} (expected {(n, n_features)}), or not finite")
    if not np.array_equal(table.labels, labels.numpy()):
        raise TableError("its labels are not the split's")


def cached_outcome_table(
    model: AdaPerceiver,
    backbone_hash: str,
    split: str,
    images: torch.Tensor | ImageFiles,
    labels: torch.Tensor,
    spec: FeatureSpec,
    cache_dir: str | Path = ".cache/outcome_tables",
    batch_size: int = 512,
    progress: bool = False,
) -> OutcomeTable:
    """The table of ``split``, from the cache when its key matches, else built and cached."""
    meta = {"backbone_hash": backbone_hash, "split": split, "split_key": _split_key(images, labels), "features": spec.to_dict()}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{split}-{backbone_hash[:12]}-{key}.npz"
    if path.is_file():
        try:
            # memory-mapped: a table built in shards for a large image folder need not fit in memory to be stepped
            table = load_table(path, mmap=True)
            if table.meta != meta:
                raise TableError(f"{path}: made for another backbone, split or features")
            check_table(table, labels, model.config.grid_shape, spec.dim(model.config))
            return table
        except TableError as err:
            tqdm.write(f"rebuilding the {split} outcome table: {err}", file=sys.stderr)
    ctx = current_context()
    rows = np.array_split(np.arange(len(labels)), ctx.world)[ctx.rank]
    mine = images[rows] if isinstance(images, torch.Tensor) else images.subset(rows)
    table = build_outcome_table(model, mine, labels[rows], spec, batch_size, meta, progress and ctx.is_main)
    if not ctx.enabled:
        save_table(table, path)
        return table
    # under torchrun each rank tabulates a contiguous slice and writes it as a shard; the main rank merges the
    # shards into the cached file in bounded memory, and every rank then reads that file memory-mapped, so no
    # process ever holds more than its own slice
    shards = [path.parent / "shards" / f"{path.stem}.rank{r:04d}-of-{ctx.world:04d}.npz" for r in range(ctx.world)]
    shards[ctx.rank].parent.mkdir(parents=True, exist_ok=True)
    save_table(table, shards[ctx.rank])
    del table
    ctx.barrier()
    if ctx.is_main:
        save_concatenated([load_table(shard, mmap=True) for shard in shards], path)
        for shard in shards:
            shard.unlink()
    ctx.barrier()
    return load_table(path, mmap=True)
