"""load_model: every offline weight source gives the same model; missing weights say what to provide."""
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitlens import HookedViT, WeightsNotFoundError, load_model
from vitlens.zoo import ZOO, random_twin

ARCH = "vit_tiny_patch16_224"
SMALL = dict(img_size=32, depth=2, num_classes=10)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False, **SMALL).eval()


def assert_same_model(model: HookedViT, reference):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert not model.training


def test_local_dir_in_save_for_hf_format(tmp_path, reference):
    timm.models.save_for_hf(reference, tmp_path / "m", model_args=SMALL, safe_serialization=True)
    assert_same_model(load_model(f"local-dir:{tmp_path / 'm'}"), reference)
    assert_same_model(load_model(tmp_path / "m"), reference)


def test_checkpoint_files_safetensors_and_weights_only_torch(tmp_path, reference):
    save_file(reference.state_dict(), tmp_path / "w.safetensors")
    model = load_model(tmp_path / "w.safetensors", arch=ARCH, **SMALL)
    assert_same_model(model, reference)
    assert model.tag == f"{ARCH}@w.safetensors"
    torch.save({"model": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "w.pth")
    assert_same_model(load_model(ARCH, checkpoint=tmp_path / "w.pth", **SMALL), reference)


class Evil:
    """Stands for any pickled object that is not a tensor."""


def test_pickled_objects_are_refused_without_unpickling_advice(tmp_path, reference):
    torch.save({"state_dict": reference.state_dict(), "extra": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil\.pth holds a pickled object of type \S*Evil, not only") as error:
        load_model(ARCH, checkpoint=tmp_path / "evil.pth", **SMALL)
    assert "weights_only=False" not in str(error.value) and "safe_globals" not in str(error.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_garbage_weight_files_are_named(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"\xff" * 100)
    with pytest.raises(ValueError, match=rf"garbage\{suffix} is not a readable") as error:
        load_model(path, arch=ARCH, **SMALL)
    assert "weights_only=False" not in str(error.value)


def test_model_folder_errors_name_the_file(tmp_path, reference):
    folder = tmp_path / "m"
    timm.models.save_for_hf(reference, folder, model_args=SMALL, safe_serialization=True)
    good_config = (folder / "config.json").read_text()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"m/config\.json is not a timm model config"):
        load_model(f"local-dir:{folder}")
    (folder / "config.json").write_text(good_config)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"m/model\.safetensors is not a readable safetensors file"):
        load_model(f"local-dir:{folder}")


def test_unexpected_keys_in_a_checkpoint_are_refused(tmp_path, reference):
    state = {**reference.state_dict(), "blocks.0.attn.extra": torch.zeros(3)}
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"w\.safetensors does not fit .*unexpected \['blocks\.0\.attn\.extra'\]"):
        load_model(tmp_path / "w.safetensors", arch=ARCH, **SMALL)
    with pytest.raises(ValueError, match=r"unexpected \['blocks\.0\.attn\.extra'\]"):
        load_model(ARCH, checkpoint=tmp_path / "w.safetensors", **SMALL)
    folder = tmp_path / "m"
    timm.models.save_for_hf(reference, folder, model_args=SMALL, safe_serialization=True)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"m/model\.safetensors does not fit .*blocks\.0\.attn\.extra"):
        load_model(f"local-dir:{folder}")


def test_home_directory_paths_are_expanded(tmp_path, monkeypatch, reference):
    monkeypatch.setenv("HOME", str(tmp_path))
    save_file(reference.state_dict(), tmp_path / "w.safetensors")
    timm.models.save_for_hf(reference, tmp_path / "m", model_args=SMALL, safe_serialization=True)
    assert_same_model(load_model("~/w.safetensors", arch=ARCH, **SMALL), reference)
    assert_same_model(load_model(ARCH, checkpoint="~/w.safetensors", **SMALL), reference)
    assert_same_model(load_model("local-dir:~/m"), reference)
    assert_same_model(load_model("~/m"), reference)


def test_random_twin_is_timm_init_under_the_seed_for_every_source(tmp_path, reference):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    twin = random_twin("tiny-scenes", seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    torch.manual_seed(7)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, patch_size=8, num_classes=10,
                              embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0).eval()
    for (name, a), b in zip(twin.vit.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    trained = load_model("tiny-scenes")
    assert not torch.equal(twin.vit.head.weight, trained.vit.head.weight)
    assert twin.data_config == trained.data_config and twin.tag == "tiny-scenes (random init, seed 7)"
    save_file(reference.state_dict(), tmp_path / "w.safetensors")
    from_file = random_twin(tmp_path / "w.safetensors", arch=ARCH, seed=0, **SMALL)
    assert_same_model(from_file, reference)  # the reference is timm's init under seed 0
    assert_same_model(random_twin(ARCH, seed=0, **SMALL), reference)


def test_checkpoint_of_another_architecture_is_named(tmp_path, reference):
    save_file(reference.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="does not fit vit_small_patch16_224"):
        load_model("vit_small_patch16_224", checkpoint=tmp_path / "w.safetensors", **SMALL)


def test_hugging_face_cache_is_used_offline(tmp_path, monkeypatch, reference):
    """A file in the HF cache layout (models--timm--NAME/snapshots/REV/) is found without a network call."""
    import huggingface_hub.constants as hf_constants

    name = f"{ARCH}.augreg_in21k_ft_in1k"
    repo = tmp_path / "hub" / f"models--timm--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file(reference.state_dict(), repo / "snapshots" / "abc123" / "model.safetensors")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert_same_model(load_model(name, **SMALL), reference)


def test_missing_weights_fail_fast_and_name_the_file(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError, match=r"timm/vit_base_patch16_224\.augreg_in21k_ft_in1k/model\.safetensors"):
        load_model("vit_b_16")
    assert time.monotonic() - start < 20  # no network retries
    with pytest.raises(WeightsNotFoundError, match="vit_base_patch16_224-CIFAR100.pt"):
        load_model("vit_cifar_16")
    with pytest.raises(WeightsNotFoundError, match="no model.safetensors|not a model folder"):
        load_model(f"local-dir:{tmp_path}")


def test_random_weights_and_unknown_names():
    torch.manual_seed(0)
    model = load_model("vit_gap_16", pretrained=False, img_size=32, depth=1)
    assert model.layout.cls_index is None and model.cfg.global_pool == "avg" and model.blocks[0].post_norm
    with pytest.raises(ValueError, match="Unknown model 'vit_base_patch16_225'.*vit_base_patch16"):
        load_model("vit_base_patch16_225")


def test_zoo_names_are_timm_models():
    for name, entry in ZOO.items():
        if not entry.bundled:
            assert timm.is_model(entry.timm_name), name
            assert entry.checkpoint_hint or timm.models.get_pretrained_cfg(entry.timm_name).hf_hub_id, name


def test_authors_checkpoint_with_unused_heads(tmp_path):
    """deit_ensemble_16: the authors' file holds extra heads (unused, as in vit-cls_emb); all model weights must be there."""
    torch.manual_seed(0)
    reference = timm.create_model("deit_base_patch16_224", pretrained=False, img_size=32, depth=1).eval()
    state = {**reference.state_dict(), "transformerheads.0.weight": torch.zeros(3)}
    torch.save(state, tmp_path / "deit_base_trm.pth")
    model = load_model("deit_ensemble_16", checkpoint=tmp_path / "deit_base_trm.pth", img_size=32, depth=1)
    assert_same_model(model, reference)
    del state["head.weight"]
    torch.save(state, tmp_path / "deit_base_trm.pth")
    with pytest.raises(ValueError, match=r"missing \['head.weight'\]"):
        load_model("deit_ensemble_16", checkpoint=tmp_path / "deit_base_trm.pth", img_size=32, depth=1)


def test_arguments_that_do_not_apply_are_refused(tmp_path, reference):
    timm.models.save_for_hf(reference, tmp_path / "m", model_args=SMALL, safe_serialization=True)
    save_file(reference.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="pretrained=False does not apply to a bundled model"):
        load_model("tiny-scenes", pretrained=False)
    with pytest.raises(ValueError, match="checkpoint= does not apply to a model folder"):
        load_model(f"local-dir:{tmp_path / 'm'}", checkpoint=tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="pretrained=False does not apply to a checkpoint file"):
        load_model(tmp_path / "w.safetensors", arch=ARCH, pretrained=False, **SMALL)
    with pytest.raises(ValueError, match="arch= does not apply to a timm model name"):
        load_model(ARCH, arch=ARCH, pretrained=False, **SMALL)


def test_num_classes_that_differs_from_the_weights_raises(tmp_path, monkeypatch, reference):
    """timm silently swaps in a random head when num_classes differs from the pretrained one."""
    import huggingface_hub.constants as hf_constants

    timm.models.save_for_hf(reference, tmp_path / "m", model_args=SMALL, safe_serialization=True)
    with pytest.raises(ValueError, match="num_classes=5 does not match"):
        load_model(tmp_path / "m", num_classes=5)
    name = f"{ARCH}.augreg_in21k_ft_in1k"
    snapshot = tmp_path / "hub" / f"models--timm--{name}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    save_file(reference.state_dict(), snapshot / "model.safetensors")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    for allow_download in (False, True):  # True: timm finds the cached file (HF_HUB_OFFLINE in the tests)
        with pytest.raises(ValueError, match="num_classes=5 does not match"):
            load_model(name, allow_download=allow_download, **{**SMALL, "num_classes": 5})
