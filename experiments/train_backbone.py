"""Train the AdaPerceiver backbone jointly over its configuration grid.

    python experiments/train_backbone.py                                  # digits -> checkpoints/digits
    python experiments/train_backbone.py --dataset fashion-mnist --epochs 16 --warmup-epochs 1 --augment-flip --augment-shift 1
    python experiments/train_backbone.py --dataset photos/ --image-size 32 --channels 3 --workers 4   # an image folder

An image folder holds one subfolder per class (or train/ and test/, each with the class subfolders); its images are
streamed from disk, resized to --image-size, and its four splits are recorded beside the checkpoint (splits.json), so
that every later script reads the same ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

import torch

from backbone.config import PRESETS, AdaPerceiverConfig, ConfigError, preset
from backbone.data import SplitConfig, default_paths, load_dataset
from backbone.errors import HelpFormatter, field_docs, nonnegative_int, positive_int, run_cli
from backbone.folders import FolderSpec, checkpoint_record, is_image_folder, training_folder
from backbone.train import TrainConfig, check_out_dir, resolve_device, train_backbone


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default="digits",
                        help="'digits', 'fashion-mnist', a path to an .npz, or an image folder (class subfolders)")
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST .gz files")
    parser.add_argument("--out", default=None, help="checkpoint directory (default runs/<dataset>/backbone)")
    parser.add_argument("--force", action="store_true", help="train over a finished checkpoint in --out")
    folder = FolderSpec()
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help=f"image folder: side the images are resized to, px (default {folder.image_size})")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help=f"image folder: 3 converts every image to RGB, 1 to grey (default {folder.channels})")
    parser.add_argument("--workers", type=nonnegative_int, default=folder.workers,
                        help="image folder: DataLoader processes reading files (0: the main process)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the four stratified splits")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--fresh", action="store_true", help="ignore a train_state.pt left by an earlier run")
    parser.add_argument("--preset", choices=("auto", *PRESETS), default="auto",
                        help="architecture: auto (by dataset) or a named one (paper-in1k: the paper's ImageNet-1K "
                             "model, 224 px RGB)")
    for field in ("embed_dim", "depth", "patch_size", "num_heads"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None, help="override the preset")
    parser.add_argument("--token-grans", type=lambda s: tuple(int(v) for v in s.split(",")), default=None,
                        help="latent token granularities, e.g. 4,8,16,32 (override the preset)")
    parser.add_argument(
        "--stem-channels", type=lambda s: tuple(int(v) for v in s.split(",") if v), default=None,
        help="conv patch embedding, e.g. 32,64 for patch size 4; '' for a linear one (override the preset)",
    )
    defaults, docs = TrainConfig(), field_docs(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = f"--{field.name.replace('_', '-')}"
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(defaults, field.name),
                                help=docs.get(field.name))
        else:
            kind = {"int": int, "float": float, "str": str}[field.type]
            parser.add_argument(flag, type=kind, default=getattr(defaults, field.name), help=docs.get(field.name))
    args = parser.parse_args(argv)

    try:  # every flag is checked before any data is read or model built
        train = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    except ValueError as err:
        parser.error(str(err))
    resolve_device(train.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or default_paths(args.dataset)["new_backbone"]
    check_out_dir(out, args.force)  # before an image folder's files are all decoded
    split = SplitConfig(seed=args.split_seed)
    if is_image_folder(args.dataset):
        spec = FolderSpec(args.image_size or folder.image_size, args.channels or folder.channels, args.workers)
        data = training_folder(args.dataset, spec, split)
        folder_meta, extra_files = checkpoint_record(data)
    else:
        if args.image_size or args.channels:
            parser.error("--image-size and --channels apply to image folders; this dataset's images keep their shape")
        data, folder_meta, extra_files = load_dataset(args.dataset, args.data_dir, split), {}, None
    try:
        arch = preset(data.name, data.image_shape, data.num_classes, args.preset).to_dict()
    except ConfigError as err:
        parser.error(str(err))
    for key in ("embed_dim", "depth", "patch_size", "num_heads", "token_grans", "stem_channels"):
        if getattr(args, key) is not None:
            arch[key] = getattr(args, key)
    try:
        model_config = AdaPerceiverConfig.from_dict(arch)
    except ValueError as err:
        parser.error(str(err))
    metadata = {
        "dataset": args.dataset,
        "split_seed": args.split_seed,
        **folder_meta,
        "command": shlex.join(["python", "experiments/train_backbone.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    return train_backbone(model_config, train, data, out, metadata, resume=not args.fresh, force=args.force,
                          extra_files=extra_files)


if __name__ == "__main__":
    run_cli(main)
