"""The ``vitlens`` command line: a thin layer over the Python API.

    vitlens record MODEL DATASET PATH --hook 'blocks.*.hook_resid_post' --hook blocks.11.hook_resid_post=cls
    vitlens record weights.safetensors scenes PATH --arch vit_base_patch16_224 --class-rank
    vitlens store info PATH | vitlens store rebuild PATH | vitlens store --schema
    vitlens analyze NAME --model M --data D --store PATH [--compat] ...

Parsing imports nothing heavy (no torch, timm or h5py: the analyses' declarations in ``analyses.commands`` stay
light too), so ``--help`` and argument errors answer at once; flags are checked before the model and dataset
load, and the model stack is imported only when a command runs. Every error is one line,
``vitlens: error: ...``, naming the flag and the fix (status 2 for arguments, 1 otherwise); Ctrl-C stops with
status 130 and says how to resume. Analyses' commands reuse the shared flags: :func:`add_model_arguments` /
:func:`model_from_args` and :func:`add_data_arguments` / :func:`dataset_from_args`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from vitlens import __version__, registry
from vitlens.layout import TOKEN_KINDS
from vitlens.zoo.catalog import WEIGHT_SUFFIXES, ZOO

_AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}
PREPROCESSING = ("timm", "vit-cls_emb")
INTERRUPTED_STATUS = 130


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``vitlens: error: MESSAGE (see 'vitlens record --help')``."""

    def error(self, message: str):
        self.exit(2, f"vitlens: error: {message} (see '{self.prog} --help')\n")


def _cpu_count() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_num_workers() -> int:
    """DataLoader workers for this machine: none on two CPUs or fewer, else one per CPU left, at most 4."""
    cpus = _cpu_count()
    return 0 if cpus <= 2 else min(4, cpus - 1)


def _count(minimum: int):
    """An argparse type: an integer of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number of at least {minimum}, got {value}")
        return value
    return parse


def _path(text: str) -> Path:
    """A path argument, with ``~`` expanded."""
    return Path(text).expanduser()


def _tokens(text: str) -> str | list[int]:
    """A token selection: "all", a kind ("cls", "patches", ...) or indices "0,5,9"."""
    if text.replace(",", "").isdigit():
        return [int(t) for t in text.split(",") if t]
    if text not in TOKEN_KINDS:
        raise argparse.ArgumentTypeError(f"unknown tokens {text!r}; expected one of {', '.join(TOKEN_KINDS)} "
                                         "or indices such as 0,5,9")
    return text


def _hook_spec(text: str) -> tuple[str, str | list[int] | None]:
    """``NAME`` (tokens from --tokens) or ``NAME=TOKENS``."""
    name, _, tokens = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME=TOKENS, got {text!r}")
    return name, _tokens(tokens) if tokens else None


# --- shared model and data flags (record and the analyses' commands) ------------------------------------------

def add_model_arguments(parser: argparse.ArgumentParser, *, positional: bool = False) -> None:
    """Add the model flags: MODEL (or ``--model``, default tiny-scenes), ``--arch``, ``--checkpoint``,
    ``--random-init``, ``--seed`` and ``--device``. Read them back with :func:`model_from_args`."""
    what = ("a zoo nickname (tiny-scenes, vit_b_16, ...), a timm model name, local-dir:PATH or a checkpoint "
            "file (.safetensors, .pth) with --arch")
    if positional:
        parser.add_argument("model", help=what)
    else:
        parser.add_argument("--model", default="tiny-scenes", help=f"{what} (default tiny-scenes)")
    parser.set_defaults(model_flag="MODEL" if positional else "--model")
    parser.add_argument("--arch", metavar="TIMM_NAME",
                        help="the timm architecture of a checkpoint file given as the model, e.g. vit_base_patch16_224")
    parser.add_argument("--checkpoint", type=_path, metavar="FILE",
                        help="weights for a zoo nickname or timm name (e.g. vit_cifar_16's file from its authors)")
    parser.add_argument("--random-init", action="store_true",
                        help="the model's architecture with random weights (timm's init under --seed): its random "
                             "twin, for baselines; reads no weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-init (default 0)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N or mps (default: cuda:$LOCAL_RANK when a GPU is present, else cpu)")


def add_data_arguments(parser: argparse.ArgumentParser, *, positional: bool = False) -> None:
    """Add the data flags: DATASET (or ``--data``, default scenes), ``--split``, ``--n-per-class``,
    ``--preprocessing``, ``--mask-resize``, ``--batch-size`` and ``--num-workers``. Read them back with
    :func:`dataset_from_args`."""
    what = "'scenes' (bundled), an ImageNet-S root or a labelled image folder root/<class>/<image>"
    if positional:
        parser.add_argument("dataset", help=what)
    else:
        parser.add_argument("--data", dest="dataset", default="scenes", help=f"{what} (default scenes)")
    parser.set_defaults(data_flag="DATASET" if positional else "--data")
    parser.add_argument("--split", default=None, help="ImageNet-S split (default validation)")
    parser.add_argument("--n-per-class", type=_count(1), default=None, metavar="N",
                        help="use only the first N images of each class")
    parser.add_argument("--preprocessing", choices=PREPROCESSING, default="timm",
                        help="timm: the model's own eval transform (default); vit-cls_emb: the class-embedding "
                             "study's bilinear resize with no crop, mean = std = 0.5")
    parser.add_argument("--mask-resize", choices=("nearest", "area"), default=None,
                        help="token masks: nearest (0/1, default) or area (object fraction of each patch)")
    parser.add_argument("--batch-size", type=_count(1), default=32, help="images per forward (default 32)")
    parser.add_argument("--num-workers", type=_count(0), default=default_num_workers(),
                        help=f"DataLoader worker processes (default {default_num_workers()} on this machine)")


def check_model_args(args: argparse.Namespace) -> None:
    """Refuse model flags that do not fit together or name missing files (before anything loads)."""
    name = os.path.expanduser(str(args.model))
    flag = args.model_flag
    is_folder = name.startswith("local-dir:") or Path(name).is_dir()
    is_file = not is_folder and Path(name).suffix in WEIGHT_SUFFIXES
    bundled = name in ZOO and ZOO[name].bundled is not None
    if name.startswith("local-dir:") and not Path(name.removeprefix("local-dir:")).expanduser().is_dir():
        raise ValueError(f"{flag} {name}: the model folder does not exist; expected a folder with config.json "
                         "and model.safetensors (timm's save_for_hf)")
    if is_file and not Path(name).is_file():
        raise ValueError(f"{flag} {name}: the checkpoint file does not exist")
    if is_file and args.arch is None:
        raise ValueError(f"{flag} {name} is a checkpoint file: add --arch with its timm architecture, "
                         "e.g. --arch vit_base_patch16_224")
    if args.arch is not None and not is_file:
        raise ValueError(f"--arch goes with a checkpoint file given as {flag} (e.g. weights.safetensors); "
                         f"{name!r} names its own architecture, so drop --arch")
    if args.checkpoint is not None:
        if args.random_init:
            raise ValueError("--checkpoint and --random-init contradict each other: the random twin reads no "
                             "weights; drop one")
        if bundled or is_folder or is_file:
            raise ValueError(f"--checkpoint does not apply to {name!r}, which brings its own weights; pass the "
                             "weights file as the model with --arch instead, or drop --checkpoint")
        if not args.checkpoint.is_file():
            raise ValueError(f"--checkpoint {args.checkpoint}: the file does not exist")
    _device(args.device)


def model_from_args(args: argparse.Namespace):
    """The :class:`~vitlens.HookedViT` the model flags describe (checked first by :func:`check_model_args`)."""
    check_model_args(args)
    from vitlens import zoo

    name = os.path.expanduser(str(args.model))
    if args.random_init:
        return zoo.random_twin(name, seed=args.seed, arch=args.arch)
    options = {"arch": args.arch} if args.arch is not None else {}
    if args.checkpoint is not None:
        options["checkpoint"] = args.checkpoint
    return zoo.load_model(name, **options)


def check_data_args(args: argparse.Namespace) -> None:
    """Refuse data flags that name a missing dataset or do not apply to it (before anything loads)."""
    flag = args.data_flag
    if args.dataset == "scenes":
        if args.split not in (None, "validation"):
            raise ValueError(f"--split {args.split}: the bundled scenes have only the validation split")
        return
    path = Path(args.dataset).expanduser()
    if not path.is_dir():
        raise ValueError(f"{flag} {args.dataset}: no such folder; expected 'scenes', an ImageNet-S root holding "
                         "ImageNetS919/ (or 300/50), or an image folder root/<class>/<image>")
    from vitlens.data.imagenet_s import is_imagenet_s

    if not is_imagenet_s(path):
        given = [f for f, value in (("--split", args.split), ("--mask-resize", args.mask_resize)) if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} do not apply to the image folder {path} (no splits, no masks); "
                             "drop them")


def dataset_from_args(args: argparse.Namespace, model, **options):
    """The dataset the data flags describe, preprocessed for `model` (`options` go to ``load_dataset``)."""
    check_data_args(args)
    from vitlens.data import load_dataset

    given = {"mask_resize": args.mask_resize,
             "preprocessing": None if args.preprocessing == "timm" else args.preprocessing}
    options = {**{k: v for k, v in given.items() if v is not None}, **options}
    name = args.dataset if args.dataset == "scenes" else Path(args.dataset).expanduser()
    return load_dataset(name, args.split or "validation", model=model, n_per_class=args.n_per_class, **options)


def _device(text: str | None):
    """The torch device of ``--device``, refused when it is not there (imports torch; after parsing only)."""
    if text is None:
        return None
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text}: not a device; expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {text}: no CUDA GPU is available here; use --device cpu, or leave "
                             "--device out to use a GPU only when there is one")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {text}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text}: MPS is not available here; use --device cpu")
    return device


# --- commands -------------------------------------------------------------------------------------------------

def _record(args: argparse.Namespace) -> None:
    if not args.hook and not args.class_rank:
        raise ValueError("nothing to record: add --hook NAME (repeatable) and/or --class-rank")
    if args.path.exists() and not args.path.is_dir():
        raise ValueError(f"PATH {args.path} is a file; expected a store folder (new or to resume)")
    check_data_args(args)
    model = model_from_args(args)
    dataset = dataset_from_args(args, model)
    import warnings

    import torch

    from vitlens.recorder import record

    cpus = _cpu_count()
    if args.num_workers > cpus:
        print(f"vitlens: note: --num-workers {args.num_workers} is more than the {cpus} CPUs here; "
              f"{default_num_workers()} is the default for this machine", file=sys.stderr)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # said once above, not in the bar
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


def schema_text() -> str:
    """The store schema that ships in the package (``vitlens/schema.md``, else the store module's docs)."""
    from importlib.resources import files

    schema = files("vitlens") / "schema.md"
    if schema.is_file():
        return schema.read_text(encoding="utf-8")
    import vitlens.store

    return vitlens.store.__doc__ or ""


class _PrintSchema(argparse.Action):
    """``vitlens store --schema``: print the schema and exit, like --version."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(schema_text().rstrip())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitlens", description="Mechanistic analysis of timm Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"vitlens {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rec = commands.add_parser(
        "record", help="record activations of a model over a dataset into an HDF5 store (resumable)",
        description="Record hook activations (and class ranks) of MODEL over DATASET into the store at PATH. "
                    "Running the same command again resumes an interrupted recording (Ctrl-C keeps every "
                    "finished shard); under torchrun each rank writes its own shards of the same store.")
    add_model_arguments(rec, positional=True)
    add_data_arguments(rec, positional=True)
    rec.add_argument("path", type=_path, help="the store directory")
    rec.add_argument("--hook", action="append", type=_hook_spec, default=[], metavar="NAME[=TOKENS]",
                     help="a hook name or glob pattern, optionally with its tokens (all, cls, dist, registers, "
                          "prefix, patches or indices 0,5,9); repeatable")
    rec.add_argument("--tokens", type=_tokens, default="all",
                     help="tokens for --hook given without =TOKENS (default all)")
    rec.add_argument("--class-rank", nargs="?", const="auto", choices=("auto", "float32", "bfloat16"),
                     default=None, metavar="PRECISION",
                     help="also store the label's rank under the class-embedding projection of every token "
                          "and layer (int16, ClassRankReducer), computed in float32, bfloat16 or auto (the "
                          "default: bfloat16 only where the hardware runs it natively)")
    rec.add_argument("--dtype", default="float16", choices=("float16", "float32", "float64"))
    rec.add_argument("--shard-size", type=_count(1), default=None, help="samples per shard (default: the recorder's)")
    rec.add_argument("--autocast", choices=sorted(_AUTOCAST), default=None, help="run the forward under autocast")
    rec.add_argument("--no-progress", action="store_true", help="no progress bar")
    rec.set_defaults(run=_record)

    store = commands.add_parser("store", help="inspect or repair an activation store; print its schema",
                                description="Inspect or repair an activation store.")
    store.add_argument("--schema", action=_PrintSchema, help="print the store's on-disk schema and exit")
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="COMMAND")
    info = store_commands.add_parser("info", help="print the store's model, samples, progress and outputs",
                                     description="Print the store's model, samples, progress and outputs.")
    info.add_argument("path", type=_path, help="the store directory")
    info.set_defaults(run=_store_info)
    rebuild = store_commands.add_parser(
        "rebuild", help="recreate index.h5 from store.json and the shards",
        description="Recreate the derived index (index.h5) from store.json and the shards alone, checking "
                    "every shard; a corrupt shard is named (delete it and resume the recording).")
    rebuild.add_argument("path", type=_path, help="the store directory")
    rebuild.set_defaults(run=_store_rebuild)

    report = commands.add_parser(
        "report", help="write an offline HTML report of a store or a folder of stores",
        description="Render every analysis found in STORE (a store, or a folder of stores such as cache/demo) into "
                    "one self-contained HTML file (plotly.js inlined); sections that are missing say which command "
                    "computes them.")
    report.add_argument("store", type=_path, help="a store or a folder of stores")
    report.add_argument("--data", default=None, help="the dataset the store was recorded on, for views over the "
                                                     "images ('scenes' or a root folder)")
    report.add_argument("--model", default=None, help="the model for --data's preprocessing (default: the store's)")
    report.add_argument("--out", type=_path, default=None, help="the HTML file (default STORE/report.html)")
    report.set_defaults(run=lambda args: registry.load("vitlens.report:main")(args))
    explore = commands.add_parser(
        "explore", help="serve a Dash explorer over a store (localhost)",
        description="Serve an interactive explorer over STORE: pick an image, a layer, a head or a method; click a "
                    "point of the dataset scatter to open its image. Reads the store lazily.")
    explore.add_argument("store", type=_path, help="a store or a folder of stores")
    explore.add_argument("--data", default=None, help="the dataset the store was recorded on (images, masks)")
    explore.add_argument("--model", default=None, help="the model for --data's preprocessing (default: the store's)")
    explore.add_argument("--host", default="127.0.0.1", help="the address to bind (default localhost only)")
    explore.add_argument("--port", type=_count(0), default=8050, help="the port (default 8050; 0: a free one)")
    explore.set_defaults(run=lambda args: registry.load("vitlens.explore:main")(args))

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


# --- errors ---------------------------------------------------------------------------------------------------

def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a command reports as one line: bad input, files, mismatches (the classes of modules it loaded)."""
    found = [ValueError, LookupError, OSError]
    for module, names in (("vitlens.hooked", ("UnsupportedModelError",)), ("vitlens.store", ("CorruptShardError",))):
        loaded = sys.modules.get(module)
        found += [getattr(loaded, name) for name in names if loaded is not None and hasattr(loaded, name)]
    return tuple(found)


def one_line(error: BaseException) -> str:
    """An exception's message on one line: a DataLoader worker's error is unwrapped to its own message."""
    text = error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else str(error)
    text = str(text)
    if "in DataLoader worker process" in text:  # "Caught X in DataLoader worker process N. Original Traceback ..."
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]*(Error|Exception)\w*: ", "", last.strip())
        text = f"in a DataLoader worker: {text}"
    elif text.startswith("DataLoader worker"):
        text += "; run again with --num-workers 0 to see the error in the main process"
    return " ".join(text.split()) or type(error).__name__


def _interrupted(error: BaseException, args: argparse.Namespace) -> str:
    """The Ctrl-C message, with the samples kept when the recorder or the store can tell."""
    kept, total = getattr(error, "kept", None), getattr(error, "total", None)
    path = getattr(args, "path", None)
    if kept is None and path is not None and sys.modules.get("vitlens.store") is not None:
        try:
            from vitlens.store import ActivationStore

            with ActivationStore(path) as store:
                kept, total = int(store.done.sum()), len(store)
        except Exception:  # no store yet: nothing kept to report
            kept = None
    counts = f" ({kept} of {total} samples kept)" if kept is not None else ""
    return f"interrupted: run the same command to resume{counts}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vitlens`` command: status 0, 1 (an error, one line), 2 (bad arguments) or 130 (Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except BaseException as error:
        interrupted = getattr(sys.modules.get("vitlens.recorder"), "RecordingInterrupted", KeyboardInterrupt)
        if isinstance(error, (KeyboardInterrupt, interrupted)):
            print(_interrupted(error, args), file=sys.stderr)
            return INTERRUPTED_STATUS
        if not isinstance(error, _expected_errors()) and "DataLoader worker" not in str(error):
            raise
        print(f"vitlens: error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
