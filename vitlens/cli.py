"""The ``vitlens`` command line: a thin layer over the Python API.

    vitlens record MODEL DATASET PATH --hook 'blocks.*.hook_resid_post' --hook blocks.11.hook_resid_post=cls
    vitlens store info PATH
    vitlens store rebuild PATH
"""
from __future__ import annotations

import argparse
import sys

from vitlens import registry

_AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}


def _tokens(text: str) -> str | list[int]:
    """A token selection: "all", a kind ("cls", "patches", ...) or indices "0,5,9"."""
    return [int(t) for t in text.split(",")] if text.replace(",", "").isdigit() else text


def _hook_spec(text: str) -> tuple[str, str | list[int] | None]:
    """``NAME`` (tokens from --tokens) or ``NAME=TOKENS``."""
    name, _, tokens = text.partition("=")
    return name, _tokens(tokens) if tokens else None


def _record(args: argparse.Namespace) -> None:
    import torch

    from vitlens.data import load_dataset
    from vitlens.recorder import record
    from vitlens.zoo import load_model

    model = load_model(args.model)
    dataset = load_dataset(args.dataset, args.split, model=model, n_per_class=args.n_per_class)
    hooks = {name: args.tokens if tokens is None else tokens for name, tokens in args.hook}
    reducers = [registry.get_reducer("class_rank")(precision=args.class_rank)] if args.class_rank else []
    store = record(model, dataset, args.path, hooks=hooks, reducers=reducers, dtype=args.dtype,
                   batch_size=args.batch_size, device=args.device, shard_size=args.shard_size,
                   num_workers=args.num_workers,
                   autocast=getattr(torch, _AUTOCAST[args.autocast]) if args.autocast else None,
                   progress=not args.no_progress)
    print(store.describe())


def _store_info(args: argparse.Namespace) -> None:
    from vitlens.store import ActivationStore

    with ActivationStore(args.path) as store:
        print(store.describe())


def _store_rebuild(args: argparse.Namespace) -> None:
    from vitlens.store import INDEX_FILE, ActivationStore

    with ActivationStore.rebuild(args.path) as store:
        print(f"rebuilt {store.path / INDEX_FILE}: {int(store.done.sum())} of {len(store)} samples in "
              f"{len(store.shards_on_disk())} shards")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitlens", description="Mechanistic analysis of timm Vision Transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rec = commands.add_parser(
        "record", help="record activations of a model over a dataset into an HDF5 store (resumable)",
        description="Record hook activations (and class ranks) of MODEL over DATASET into the store at PATH. "
                    "Running the same command again resumes an interrupted recording; under torchrun each "
                    "rank writes its own shards of the same store.")
    rec.add_argument("model", help="a model name for vitlens.load_model (zoo nickname, timm name, checkpoint)")
    rec.add_argument("dataset", help="'scenes', an ImageNet-S root or a labelled image folder")
    rec.add_argument("path", help="the store directory")
    rec.add_argument("--hook", action="append", type=_hook_spec, default=[], metavar="NAME[=TOKENS]",
                     help="a hook name or glob pattern, optionally with its tokens (all, cls, registers, "
                          "prefix, patches or indices 0,5,9); repeatable")
    rec.add_argument("--tokens", type=_tokens, default="all",
                     help="tokens for --hook given without =TOKENS (default all)")
    rec.add_argument("--class-rank", nargs="?", const="float32", choices=("float32", "bfloat16"),
                     default=None, metavar="PRECISION",
                     help="also store the label's rank under the class-embedding projection of every token "
                          "and layer (int16, ClassRankReducer), computed in float32 (default) or bfloat16")
    rec.add_argument("--dtype", default="float16", choices=("float16", "float32", "float64"))
    rec.add_argument("--batch-size", type=int, default=32)
    rec.add_argument("--device", default=None, help="default: cuda:$LOCAL_RANK when available, else cpu")
    rec.add_argument("--shard-size", type=int, default=None, help="samples per shard (default about 256 MB)")
    rec.add_argument("--num-workers", type=int, default=4, help="DataLoader workers")
    rec.add_argument("--autocast", choices=sorted(_AUTOCAST), default=None, help="run the forward under autocast")
    rec.add_argument("--split", default="validation", help="dataset split (ImageNet-S)")
    rec.add_argument("--n-per-class", type=int, default=None, help="use only the first N images of each class")
    rec.add_argument("--no-progress", action="store_true", help="no progress bar")
    rec.set_defaults(run=_record)

    store = commands.add_parser("store", help="inspect or repair an activation store",
                                description="Inspect or repair an activation store.")
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="COMMAND")
    info = store_commands.add_parser("info", help="print the store's model, samples, progress and outputs",
                                     description="Print the store's model, samples, progress and outputs.")
    info.add_argument("path", help="the store directory")
    info.set_defaults(run=_store_info)
    rebuild = store_commands.add_parser(
        "rebuild", help="recreate index.h5 from store.json and the shards",
        description="Recreate the derived index (index.h5) from store.json and the shards alone, checking "
                    "every shard; a corrupt shard is named (delete it and resume the recording).")
    rebuild.add_argument("path", help="the store directory")
    rebuild.set_defaults(run=_store_rebuild)

    analyze = commands.add_parser("analyze", help="run an analysis of the class-embedding study over a dataset",
                                  description="Run one of the published analyses; each writes its tables as CSV.")
    analyses = analyze.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for command in registry.commands("analyze"):
        _add_command(analyses, command)
    for command in registry.commands(""):
        _add_command(commands, command)
    return parser


def _add_command(subparsers, command: registry.Command) -> None:
    """A subcommand declared in the analyses registry; its target is imported only when it runs."""
    parser = subparsers.add_parser(command.name, help=command.help, description=command.description or command.help)
    if command.arguments is not None:
        command.arguments(parser)
    parser.set_defaults(run=lambda args: registry.load(command.target)(args))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vitlens`` command; errors print one line and exit with status 1."""
    from vitlens.hooked import UnsupportedModelError
    from vitlens.store import CorruptShardError

    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, KeyError, OSError,  # mismatches, bad arguments and hooks, files
            CorruptShardError, UnsupportedModelError) as error:
        print(f"vitlens: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
