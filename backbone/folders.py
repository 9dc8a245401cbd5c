"""Image-folder datasets: class subfolders of image files, read from disk batch by batch, never whole.

Layout: ``DIR/<class>/<image>`` (all four splits cut from it), or ``DIR/train/<class>/...`` with
``DIR/test/<class>/...`` (the test split is ``DIR/test``; the other three are cut from ``DIR/train``). Files are
those torchvision's ``ImageFolder`` reads (its ``make_dataset`` lists them, by extension, in sorted order); classes
are the class folders' names, sorted, and a class's label is its place in that order.

Every image is converted to RGB or grey, resized to ``size x size`` (bicubic; the aspect ratio is not kept, exactly
as ``inference.inputs`` and the server read image files, so a backbone sees the same pixels however it is fed)
and made a float32 ``(C, H, W)`` tensor in ``[0, 1]`` by torchvision's ``ToTensor``.

The splits are cut once, when the backbone is trained, and recorded as file lists (``splits.json`` beside the
checkpoint, with a digest of the folder's file list: names and sizes). Every later script reads those lists, and
refuses a folder whose file list changed since, naming a file that was added, removed or changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from tqdm import tqdm

from backbone.data import SPLIT_NAMES, DataError, Dataset, Split, SplitConfig, dataset_name, split_rows
from backbone.io import sha256_file

SPLITS_FILE = "splits.json"
"""The recorded splits, beside a checkpoint's weights."""
RECORD_FORMAT = 1
RESIZE = "bicubic to size x size, aspect not kept"
"""How images are resized (recorded with the splits: a change here would change every table's inputs)."""


def is_image_folder(dataset: str | Path) -> bool:
    """Whether a ``--dataset`` argument names a folder (the image-folder layout) rather than a named set or .npz
    (the names win: a folder called ``digits`` is ``./digits``)."""
    return str(dataset) not in ("digits", "fashion-mnist") and Path(dataset).is_dir()


@dataclass(frozen=True)
class FolderSpec:
    """How an image folder's files become the backbone's input tensors, and how many processes read them."""

    image_size: int = 32
    """Side of the square the images are resized to, in pixels."""
    channels: int = 3
    """3: RGB, 1: grey; every image is converted to it (alpha dropped, palettes expanded)."""
    workers: int = 2
    """DataLoader worker processes that read and decode files (0: in the main process)."""

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")

    @property
    def mode(self) -> str:
        """The PIL mode every image is converted to."""
        return "RGB" if self.channels == 3 else "L"


def converted(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in PIL mode ``mode`` ('RGB' or 'L'); ``ValueError`` where PIL has no such conversion."""
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit grey: scaled to 8 bits from its full depth (a plain convert would clip it to 0 / 255)
        wide = np.asarray(image, dtype=np.float64) / 65535
        image = Image.fromarray(np.round(255 * wide.clip(0, 1)).astype(np.uint8), "L")
    return image.convert(mode)


def read_image(path: Path, spec: FolderSpec) -> tuple[torch.Tensor, str]:
    """One file as float32 ``(C, size, size)`` in ``[0, 1]``, and the PIL mode it was stored in.

    A file PIL cannot decode (truncated, not an image) or whose mode has no conversion to ``spec.mode`` is a
    ``DataError`` naming it.
    """
    try:
        with Image.open(path) as image:
            mode = image.mode
            image.load()  # decode now: a truncated file fails here, with its name, not later in a worker
            try:  # Pillow converts every mode it decodes from a file today; a plugin's own mode may not
                image = converted(image, spec.mode)
            except ValueError as err:
                raise DataError(f"{path}: images in mode {mode} cannot be converted to {spec.mode} ({err}); save it "
                                f"again as an RGB or grey PNG/JPEG") from err
            resized = image.resize((spec.image_size, spec.image_size), Image.Resampling.BICUBIC)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"{path}: not a readable image ({reason}); remove it or save it again as PNG/JPEG") from err
    return transforms.functional.to_tensor(resized), mode


class ImageFiles(torch.utils.data.Dataset):
    """The images of one split: files under ``root``, read and resized on access; ``images[i]`` is ``(C, H, W)``."""

    def __init__(self, root: str | Path, files: Sequence[str], spec: FolderSpec) -> None:
        self.root, self.files, self.spec = Path(root), list(files), spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return read_image(self.root / self.files[i], self.spec)[0]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(n, C, H, W)`` of the images it yields."""
        return len(self), self.spec.channels, self.spec.image_size, self.spec.image_size

    def subset(self, rows: Sequence[int]) -> ImageFiles:
        return ImageFiles(self.root, [self.files[int(i)] for i in rows], self.spec)

    def key(self) -> str:
        """A digest of what the images are: the file names, the size, the channels and the resize."""
        digest = hashlib.sha256(json.dumps([self.spec.image_size, self.spec.channels, RESIZE]).encode())
        for name in self.files:
            digest.update(name.encode() + b"\n")
        return digest.hexdigest()


class _Failed:
    """A batch in which a file could not be read (built in a worker; raised as a ``DataError`` by the reader)."""

    def __init__(self, message: str) -> None:
        self.message = message


class _Guarded(torch.utils.data.Dataset):
    """``ImageFiles`` whose failures are returned, not raised: a worker's exception would reach the user as a
    traceback from the worker process; this way the main process raises the one-line ``DataError``."""

    def __init__(self, images: ImageFiles, modes: bool = False) -> None:
        self.images, self.modes = images, modes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            pixels, mode = read_image(self.images.root / self.images.files[i], self.images.spec)
        except DataError as err:
            return _Failed(str(err))
        return mode if self.modes else pixels


def _collate(items: list):
    failed = [item for item in items if isinstance(item, _Failed)]
    if failed:
        return failed[0]
    return items if isinstance(items[0], str) else torch.stack(items)


def _load(images: ImageFiles, batches: list, modes: bool = False) -> Iterator:
    loader = DataLoader(_Guarded(images, modes), batch_sampler=batches, num_workers=images.spec.workers,
                        collate_fn=_collate)
    for batch in loader:
        if isinstance(batch, _Failed):
            raise DataError(batch.message)
        yield batch


def image_batches(images: torch.Tensor | ImageFiles, batch_size: int,
                  rows: Sequence[int] | torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Batches ``(B, C, H, W)`` of ``images`` (all of them in order, or ``rows`` in their order), ``batch_size`` each
    but the last: slices of an in-memory tensor, or files read by a DataLoader with ``spec.workers`` processes."""
    order = torch.arange(len(images)) if rows is None else torch.as_tensor(rows)
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if isinstance(images, torch.Tensor):
        if rows is None:  # slices are views: no copy of a split in memory
            yield from (images[i : i + batch_size] for i in range(0, len(images), batch_size))
        else:
            yield from (images[chunk] for chunk in chunks)
        return
    yield from _load(images, [chunk.tolist() for chunk in chunks])


def head(images: torch.Tensor | ImageFiles, n: int) -> torch.Tensor | ImageFiles:
    """The first ``n`` images, of the same kind (a view of a tensor; a shorter file list)."""
    return images[:n] if isinstance(images, torch.Tensor) else images.subset(range(min(n, len(images))))


def resident(images: torch.Tensor | ImageFiles, n: int, batch_size: int = 256) -> torch.Tensor:
    """The first ``n`` images as one in-memory tensor (for timing, where reading files must not be timed)."""
    part = head(images, n)
    return part if isinstance(part, torch.Tensor) else torch.cat(list(image_batches(part, batch_size)))


def check_files(images: ImageFiles, progress: bool = True) -> Counter:
    """Decode every file once (``spec.workers`` processes, a progress bar): the first one that cannot be read or
    converted is a ``DataError`` naming it; returns how many files each PIL mode has."""
    chunks = [list(range(i, min(i + 64, len(images)))) for i in range(0, len(images), 64)]
    counts: Counter = Counter()
    with tqdm(total=len(images), desc=f"checking {len(images)} images", unit="image", disable=not progress) as bar:
        for modes in _load(images, chunks, modes=True):  # closed on an error too: the error line is a line of its own
            counts.update(modes)
            bar.update(len(modes))
    return counts


def mode_note(root: Path, counts: Counter, spec: FolderSpec) -> str | None:
    """The line that says images of other modes were converted (None when every image already is ``spec.mode``)."""
    if set(counts) <= {spec.mode}:
        return None
    found = ", ".join(f"{mode} ({n})" for mode, n in sorted(counts.items()))
    return f"note: {root}: images in modes {found}; every one converted to {spec.mode} (alpha dropped, palettes expanded)"


# ---- scanning and the recorded splits -------------------------------------------------------------------------------


def _class_folders(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _scan(part: Path, classes: list[str] | None = None, min_classes: int = 2) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes under ``part`` and its image files as ``(path relative to part, label)``; refuses a folder without
    class folders, with fewer than ``min_classes``, or with an empty class folder."""
    found = _class_folders(part)
    if not found:
        images = [p.name for p in part.iterdir() if p.suffix.lower() in IMG_EXTENSIONS]
        hint = (f" (it holds {len(images)} images directly: infer.py and calibrate.py read such a folder, training "
                "needs the class folders)" if images else "")
        raise DataError(f"{part}: no class folders{hint}; put each class's images in a subfolder of its own, "
                        f"{part}/<class>/<image>.png")
    if classes is not None and found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        what = f"has no folder for class {missing[0]!r}" if missing else f"has a class {extra[0]!r} that train/ lacks"
        raise DataError(f"{part} {what}; give train/ and test/ the same class folders")
    if len(found) < min_classes:
        raise DataError(f"{part}: one class folder only ({found[0]}); a classifier needs at least two classes, "
                        "one folder each")
    entries = make_dataset(str(part), {name: i for i, name in enumerate(found)}, extensions=IMG_EXTENSIONS,
                           allow_empty=True)
    counts = Counter(label for _, label in entries)
    for i, name in enumerate(found):
        if counts[i] == 0:
            raise DataError(f"{part / name}: class folder holds no image files ({', '.join(IMG_EXTENSIONS)}); "
                            "add images or remove the folder")
    return found, [(os.path.relpath(path, part), label) for path, label in entries]


@dataclass
class FolderScan:
    """What a folder holds now: its classes and its image files, with their sizes in bytes."""

    root: Path
    layout: str
    """'classes' (DIR/<class>/...) or 'train_test' (DIR/train/<class>/... and DIR/test/<class>/...)."""
    classes: list[str]
    pool: list[tuple[str, int]]
    """Files the three non-test splits are cut from, as (path relative to root, label)."""
    test: list[tuple[str, int]] | None
    """The test folder's files (layout 'train_test'), else None."""
    sizes: dict[str, int]

    def digest(self) -> str:
        """sha256 over every file's relative path and size in bytes, in path order."""
        digest = hashlib.sha256()
        for name in sorted(self.sizes):
            digest.update(f"{name}\t{self.sizes[name]}\n".encode())
        return digest.hexdigest()


def scan_folder(root: str | Path, min_classes: int = 2) -> FolderScan:
    """List an image folder (either layout), refusing the bad ones with one ``DataError`` naming the folder
    (``min_classes`` 1 for images that are only classified, not trained on)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train != has_test:
        have, lack = ("train", "test") if has_train else ("test", "train")
        raise DataError(f"{root} has {have}/ but no {lack}/; give both, or put the class folders directly in {root}")
    if has_train:
        classes, pool = _scan(root / "train", min_classes=min_classes)
        _, test = _scan(root / "test", classes, min_classes)
        pool = [(str(Path("train", name)), label) for name, label in pool]
        test = [(str(Path("test", name)), label) for name, label in test]
    else:
        (classes, pool), test = _scan(root, min_classes=min_classes), None
    sizes = {name: (root / name).stat().st_size for name, _ in pool + (test or [])}
    return FolderScan(root, "train_test" if has_train else "classes", classes, pool, test, sizes)


def _changes(scan: FolderScan, record: dict, source: str) -> str:
    """The one line that says how the folder's file list differs from the recorded one."""
    recorded = {name: size for rows in record["splits"].values() for name, size in rows}
    added = sorted(set(scan.sizes) - set(recorded))
    removed = sorted(set(recorded) - set(scan.sizes))
    changed = sorted(n for n in set(scan.sizes) & set(recorded) if scan.sizes[n] != recorded[n])
    if added:
        first = f"{scan.root / added[0]} was added"
    elif removed:
        first = f"{scan.root / removed[0]} was removed"
    elif changed:
        first = f"{scan.root / changed[0]} changed size ({recorded[changed[0]]} -> {scan.sizes[changed[0]]} bytes)"
    else:
        first = f"its classes are now {scan.classes}, were {record['classes']}"
    return (f"{scan.root}: the file list changed since its splits were recorded in {source}: {first} ({len(added)} "
            f"added, {len(removed)} removed, {len(changed)} changed in all); restore the folder as it was, or train a "
            f"new backbone on it (experiments/train_backbone.py --dataset {scan.root})")


def cut_splits(scan: FolderScan, split: SplitConfig, spec: FolderSpec) -> dict:
    """The record of the four seeded stratified splits of a scanned folder (what ``splits.json`` holds)."""
    labels = np.array([label for _, label in scan.pool], dtype=np.int64)
    rows = split_rows(labels, split, test_set=scan.test is not None, source=str(scan.root))
    files = {name: [scan.pool[i][0] for i in rows[name]] for name in SPLIT_NAMES[:3]}
    files["test"] = [name for name, _ in scan.test] if scan.test is not None else [scan.pool[i][0] for i in rows["test"]]
    return {
        "format": RECORD_FORMAT,
        "root": str(scan.root.resolve()),
        "layout": scan.layout,
        "classes": scan.classes,
        "image_size": spec.image_size,
        "channels": spec.channels,
        "resize": RESIZE,
        "split": asdict(split),
        "files_digest": scan.digest(),
        "n_files": len(scan.sizes),
        "splits": {name: [[f, scan.sizes[f]] for f in files[name]] for name in SPLIT_NAMES},
    }


def load_folder(root: str | Path, spec: FolderSpec, split: SplitConfig | None = None, record: dict | None = None,
                source: str = SPLITS_FILE) -> Dataset:
    """An image folder as a ``Dataset`` whose splits stream their files (``Split.x`` is an ``ImageFiles``).

    Without ``record`` the splits are cut now (seeded by ``split``); with one (``recorded_splits`` of a
    checkpoint; ``source`` names it in messages) its file lists are used, after checking that the folder's
    file list is the one they were cut from.
    """
    scan = scan_folder(root)
    if record is None:
        record = cut_splits(scan, split or SplitConfig(), spec)
    elif record.get("files_digest") != scan.digest() or record.get("classes") != scan.classes:
        raise DataError(_changes(scan, record, source))
    index = {name: i for i, (name, _) in enumerate(scan.pool + (scan.test or []))}
    labels = dict(scan.pool + (scan.test or []))
    splits = {}
    for name in SPLIT_NAMES:
        files = [f for f, _ in record["splits"][name]]
        splits[name] = Split(ImageFiles(scan.root, files, spec), torch.tensor([labels[f] for f in files]),
                             np.array([index[f] for f in files], dtype=np.int64))
    return Dataset(dataset_name(str(root)), len(scan.classes), splits, classes=list(scan.classes), record=record)


def all_files(data: Dataset) -> ImageFiles:
    """Every file of a folder dataset's four splits, as one ``ImageFiles``."""
    first = data.splits["test"].x
    return ImageFiles(first.root, [f for name in SPLIT_NAMES for f in data.splits[name].x.files], first.spec)


def recorded_splits(directory: str | Path, meta: dict) -> dict | None:
    """The splits recorded beside a checkpoint (``meta`` is its ``config.json`` less the architecture), checked
    against the sha256 the checkpoint was written with; None for a checkpoint of an array dataset."""
    entry = meta.get("splits")
    if entry is None:
        return None
    path = Path(directory) / entry["file"]
    if not path.is_file() or sha256_file(path) != entry["sha256"]:
        raise DataError(f"{path} is missing or not the file {Path(directory) / 'config.json'} was written with; "
                        "restore the checkpoint, or train it again")
    return json.loads(path.read_text())


def training_folder(root: str | Path, spec: FolderSpec, split: SplitConfig, progress: bool = True) -> Dataset:
    """An image folder for a new backbone: scanned, its splits cut, every file decoded once (so that a bad file
    stops the run before anything is written), and a note on stderr when images of other modes are converted."""
    data = load_folder(root, spec, split)
    note = mode_note(Path(root), check_files(all_files(data), progress), spec)
    if note:
        tqdm.write(note, file=sys.stderr)
    return data


def checkpoint_record(data: Dataset) -> tuple[dict, dict[str, bytes]]:
    """What a checkpoint of a folder dataset carries: metadata for ``config.json`` (the class names, the recorded
    splits' file and sha256) and the extra file itself (``splits.json``)."""
    # compact, unlike the project's other JSON files: a million images' file names, one per line, would triple it
    text = (json.dumps(data.record, separators=(",", ":")) + "\n").encode()
    meta = {"classes": data.classes,
            "splits": {"file": SPLITS_FILE, "sha256": hashlib.sha256(text).hexdigest(), "files": data.record["n_files"],
                       "files_digest": data.record["files_digest"]}}
    return meta, {SPLITS_FILE: text}
