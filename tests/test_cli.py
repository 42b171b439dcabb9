"""The vitlens command line: parsing imports nothing heavy, flags are checked before anything loads, every error is
one `vitlens: error:` line naming the flag, Ctrl-C says how to resume (status 130), the shared model and data
flags build the same models and datasets as the Python API."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

import vitlens
from vitlens import cli, registry
from vitlens.data import ensure_scenes
from vitlens.zoo import random_twin

HEAVY = ("torch", "timm", "h5py", "numpy", "pandas", "transformer_lens")


def imported_modules(*args: str) -> tuple[set[str], subprocess.CompletedProcess]:
    """The top-level modules a `python -m vitlens.cli ARGS` run imported (from -X importtime), and the run."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "vitlens.cli", *args], capture_output=True,
                         text=True, timeout=120)
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in run.stderr.splitlines()
             if line.startswith("import time:")}
    return names, run


@pytest.mark.parametrize("args, status, heavy", [
    (["--help"], 0, HEAVY), (["record", "--help"], 0, HEAVY), (["--version"], 0, HEAVY),
    (["record", "tiny-scenes", "scenes", "x", "--batch-size", "0"], 2, HEAVY),
    (["store", "--schema"], 0, ("torch", "timm", "transformer_lens"))])
def test_parsing_imports_no_model_stack(args, status, heavy):
    names, run = imported_modules(*args)
    assert run.returncode == status, run.stderr[-2000:]
    assert "vitlens" in names and "argparse" in names  # importtime did report
    assert not set(heavy) & names, sorted(set(heavy) & names)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    try:
        status = cli.main(list(args))
    except SystemExit as exit_info:
        status = exit_info.code
    out, err = capsys.readouterr()
    return status, out, err


def test_version_and_schema(capsys):
    status, out, _ = run_main(capsys, "--version")
    assert status == 0 and out.strip() == f"vitlens {vitlens.__version__}"
    status, out, _ = run_main(capsys, "store", "--schema")
    assert status == 0 and out.startswith("# Activation stores") and "schema_version" in out and "store.json" in out


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model or dataset is loaded: the errors under test must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("loaded before the arguments were checked")

    monkeypatch.setattr("vitlens.zoo.load_model", refuse)
    monkeypatch.setattr("vitlens.zoo.random_twin", refuse)
    monkeypatch.setattr("vitlens.data.load_dataset", refuse)


def test_argument_errors_are_one_line_naming_the_flag(capsys, no_loading, tmp_path):
    (tmp_path / "folder" / "cats").mkdir(parents=True)
    (tmp_path / "w.safetensors").write_bytes(b"")
    store = str(tmp_path / "store")
    cases = [
        (["record", "tiny-scenes", "scenes", store], 1, "nothing to record: add --hook NAME"),
        (["record", "tiny-scenes", "scenes", store, "--batch-size", "0"], 2, "argument --batch-size: expected a number of at least 1"),
        (["record", "tiny-scenes", "scenes", store, "--hook", "x=middle"], 2, "argument --hook: unknown tokens 'middle'"),
        (["record", str(tmp_path / "w.safetensors"), "scenes", store, "--hook", "hook_logits"], 1,
         "is a checkpoint file: add --arch"),
        (["record", "tiny-scenes", "scenes", store, "--hook", "hook_logits", "--arch", "vit_base_patch16_224"], 1,
         "--arch goes with a checkpoint file given as MODEL"),
        (["record", "tiny-scenes", "scenes", store, "--hook", "hook_logits", "--checkpoint", "w.pth"], 1,
         "--checkpoint does not apply to 'tiny-scenes'"),
        (["record", "vit_b_16", "scenes", store, "--hook", "hook_logits", "--checkpoint", "w.pth", "--random-init"],
         1, "--checkpoint and --random-init contradict"),
        (["record", "tiny-scenes", str(tmp_path / "nowhere"), store, "--hook", "hook_logits"], 1,
         "DATASET " + str(tmp_path / "nowhere") + ": no such folder"),
        (["record", "tiny-scenes", str(tmp_path / "folder"), store, "--hook", "hook_logits", "--split", "train"], 1,
         "--split do not apply to the image folder"),
        (["record", "tiny-scenes", "scenes", store, "--hook", "hook_logits", "--device", "warp9"], 1,
         "--device warp9: not a device"),
    ]
    for args, expected_status, message in cases:
        status, out, err = run_main(capsys, *args)
        assert status == expected_status, (args, err)
        assert err.startswith("vitlens: error: ") and err.count("\n") == 1 and message in err, (args, err)
        assert "hooks=" not in err and "arch=" not in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys, no_loading, tmp_path):
    status, _, err = run_main(capsys, "record", "tiny-scenes", "scenes", str(tmp_path / "s"), "--hook",
                              "hook_logits", "--device", "cuda")
    assert status == 1 and err == ("vitlens: error: --device cuda: no CUDA GPU is available here; use --device "
                                   "cpu, or leave --device out to use a GPU only when there is one\n")


class Corrupt(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise ValueError("cannot read image /data/cats/broken.jpg: truncated; expected a readable image file")


def fail_in_worker(args):
    next(iter(DataLoader(Corrupt(), num_workers=1)))


def interrupt(args):
    raise KeyboardInterrupt


class Interrupted(KeyboardInterrupt):
    kept, total = 24, 40


def interrupt_with_counts(args):
    raise Interrupted()


@pytest.fixture
def test_commands(monkeypatch):
    for name in ("fail_in_worker", "interrupt", "interrupt_with_counts"):
        command = registry.Command("", name.replace("_", "-"), "a test command", f"test_cli:{name}")
        monkeypatch.setitem(registry._discover().commands, ("", command.name), command)


def test_dataloader_worker_errors_and_ctrl_c(capsys, test_commands):
    status, _, err = run_main(capsys, "fail-in-worker")
    assert status == 1 and err == ("vitlens: error: in a DataLoader worker: cannot read image /data/cats/broken.jpg: "
                                   "truncated; expected a readable image file\n")
    status, _, err = run_main(capsys, "interrupt")
    assert status == 130 and err == "interrupted: run the same command to resume\n"
    status, _, err = run_main(capsys, "interrupt-with-counts")
    assert status == 130 and err == "interrupted: run the same command to resume (24 of 40 samples kept)\n"


def test_default_workers_follow_the_machine(monkeypatch):
    for cpus, workers in ((1, 0), (2, 0), (3, 2), (8, 4), (64, 4)):
        monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert cli.default_num_workers() == workers
        parser = argparse.ArgumentParser()
        cli.add_data_arguments(parser)
        assert parser.parse_args([]).num_workers == workers


def parse(*args: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_model_arguments(parser)
    cli.add_data_arguments(parser)
    return parser.parse_args(list(args))


def test_random_init_and_arch_build_the_models_of_the_python_api(tmp_path, monkeypatch):
    twin = cli.model_from_args(parse("--random-init", "--seed", "3"))
    reference = random_twin("tiny-scenes", seed=3)
    assert twin.tag == "tiny-scenes (random init, seed 3)"
    for (name, a), b in zip(twin.vit.state_dict().items(), reference.vit.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(twin.vit.head.weight, vitlens.load_model("tiny-scenes").vit.head.weight)
    torch.manual_seed(0)
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=10)
    monkeypatch.setenv("HOME", str(tmp_path))
    save_file(small.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="does not fit"):  # the 224-px architecture, as the flags say
        cli.model_from_args(parse("--model", "~/w.safetensors", "--arch", "vit_tiny_patch16_224"))


def test_data_flags_and_home_paths(tmp_path, monkeypatch):
    model = vitlens.load_model("tiny-scenes")
    monkeypatch.setenv("VITLENS_CACHE", str(tmp_path / "cache"))
    args = parse("--preprocessing", "vit-cls_emb", "--n-per-class", "1", "--mask-resize", "area")
    dataset = cli.dataset_from_args(args, model)
    assert len(dataset) == 10 and dataset.mask_resize == "area"
    assert dataset.data_config["crop_mode"] == "squash" and dataset.data_config["preprocessing"] == "vit-cls_emb"
    monkeypatch.setenv("HOME", str(tmp_path))
    parser = cli.build_parser()
    args = parser.parse_args(["record", "tiny-scenes", "~/scenes", "~/store", "--hook", "hook_logits"])
    assert args.path == tmp_path / "store"
    scenes = ensure_scenes(tmp_path / "cache")
    (tmp_path / "scenes").symlink_to(scenes)
    assert len(cli.dataset_from_args(args, model)) == len(dataset) * 50
