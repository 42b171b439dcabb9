"""Vision DiffMask: gates over HookedViT hooks, hard-concrete gates, training, checkpoints, the toy task, the CLI."""
from __future__ import annotations

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vitlens
from analyses.diffmask import CountingTask, DiffMask, Trainer, hf_vit_to_timm, run, train
from analyses.diffmask.gates import log_keep_probability, sample_gates
from analyses.diffmask.toy import COLOURS, RED, pretrained_toy_vit
from analyses.explain import explain, methods
from tests.helpers.tiny import tiny_model
from vitlens import HookedViT


@pytest.fixture(scope="module")
def model() -> HookedViT:
    return vitlens.load_model("tiny-scenes")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def scenes(model):
    from vitlens.data import load_dataset

    return load_dataset("scenes", model=model, n_per_class=4, mask_resize="area")


def perturbed(model: HookedViT, seed: int = 0, **kwargs) -> DiffMask:
    """A DiffMask whose gates are far from their initial all-open state (logits spread around 0)."""
    torch.manual_seed(seed)
    diffmask = DiffMask(model, add_activation=0.0, **kwargs)
    with torch.no_grad():
        for gate in diffmask.g_hat:
            gate.add_activation.normal_()
    return diffmask


# -- the masked forward -----------------------------------------------------------------------------------

def test_all_gates_open_give_the_original_logits_exactly(model, images):
    diffmask = perturbed(model)
    assert torch.equal(diffmask.masked_logits(images, torch.ones(3, 6, 6)), model.vit(images))
    registers = tiny_model(reg_tokens=2)
    assert torch.equal(DiffMask(registers).masked_logits(torch.ones(2, 3, 32, 32), torch.ones(2, 16)),
                       registers.vit(torch.ones(2, 3, 32, 32)))


def test_closed_gates_put_the_placeholder_before_the_position_embedding(model, images):
    diffmask = perturbed(model)
    vit = model.vit
    with torch.no_grad():  # every patch embedding replaced by the placeholder, then timm's own path
        x = vit.norm_pre(vit._pos_embed(diffmask.placeholder.expand(3, 36, -1)))
        expected = vit.forward_head(vit.norm(vit.blocks(x)))
    torch.testing.assert_close(diffmask.masked_logits(images, torch.zeros(3, 36)), expected)


def test_hidden_states_are_the_embedding_with_cls_every_block_input_and_the_last_output(model, images):
    diffmask = DiffMask(model)
    logits, states = diffmask.read(images)
    vit = model.vit
    assert len(states) == 4 + 2 == diffmask.n_gates
    torch.testing.assert_close(states[0][:, 0], vit.cls_token[0].expand(3, -1))  # raw CLS, no position
    torch.testing.assert_close(states[0][:, 1:], vit.patch_embed(images))
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    for i, block in enumerate(vit.blocks):
        torch.testing.assert_close(states[i + 1], x)
        x = block(x)
    torch.testing.assert_close(states[-1], x)
    torch.testing.assert_close(logits, vit(images))


# -- hard-concrete gates and the mask ---------------------------------------------------------------------

def test_hard_concrete_keep_probability_matches_sampling():
    logits = torch.tensor([-2.0, 0.0, 1.5]).repeat(40000, 1)
    torch.manual_seed(0)
    z = sample_gates(logits)
    assert z.min() == 0 and z.max() <= 1
    expected = torch.sigmoid(torch.tensor([-2.0, 0.0, 1.5]) + 0.2 * math.log(5))  # P(z > 0), §B4
    torch.testing.assert_close((z > 0).float().mean(0), expected, atol=0.01, rtol=0)
    torch.testing.assert_close(log_keep_probability(torch.zeros(1)).exp(), torch.sigmoid(torch.tensor([0.32189])),
                               atol=1e-5, rtol=0)


def independent_logits(model: HookedViT, images, state: dict, mul: float) -> torch.Tensor:
    """Gate logits [batch pos gates] from an original-key state dict, written out plainly."""
    _, cache = model.run_with_cache(images)
    vit = model.vit
    h0 = torch.cat([vit.cls_token.expand(len(images), -1, -1), cache["hook_embed"]], 1)
    hidden = [h0] + [cache["resid_pre", i] for i in range(4)] + [cache["resid_post", 3]]

    def weight(prefix):
        v, g = state[f"{prefix}.weight_v"], state[f"{prefix}.weight_g"]
        return g * v / v.norm(dim=1, keepdim=True)

    logits = []
    for i, h in enumerate(hidden):
        p = f"gate.g_hat.{i}.f"
        a = torch.tanh(torch.cat([h0, h], -1) @ weight(f"{p}.0").T + state[f"{p}.0.bias"])
        out = torch.tanh(a @ weight(f"{p}.2").T + state[f"{p}.2.bias"])
        logits.append(out[..., 0] * mul + state[f"gate.g_hat.{i}.add_activation"])
    return torch.stack(logits, -1)


def original_state(d_model: int = 64, n_gates: int = 6, seed: int = 0, new_style: bool = False) -> dict:
    """A state dict with the original's key names (random values), as Lightning saved it."""
    g = torch.Generator().manual_seed(seed)
    hidden = d_model // 4
    names = ("parametrizations.weight.original0", "parametrizations.weight.original1") if new_style else \
        ("weight_g", "weight_v")
    state = {}
    for i in range(n_gates):
        for layer, (n_in, n_out) in (("0", (2 * d_model, hidden)), ("2", (hidden, 1))):
            p = f"gate.g_hat.{i}.f.{layer}"
            state[f"{p}.{names[0]}"] = torch.rand(n_out, 1, generator=g) + 0.5
            state[f"{p}.{names[1]}"] = torch.randn(n_out, n_in, generator=g)
            state[f"{p}.bias"] = torch.randn(n_out, generator=g) * 0.1
        state[f"gate.g_hat.{i}.add_activation"] = torch.randn((), generator=g)
        state[f"alpha.{i}"] = torch.tensor(20.0 + i)
    state["gate.placeholder"] = torch.randn(1, 1, d_model, generator=g)
    for name in ("running_acc", "running_l0", "running_steps"):
        state[name] = torch.ones(n_gates)
    return state


def test_original_state_dict_gives_the_product_of_sigmoids(model, images):
    state = original_state()
    diffmask = DiffMask.from_original(model, state)
    logits = independent_logits(model, images, state, mul=15.0)
    expected = torch.sigmoid(logits + 0.2 * math.log(5)).prod(-1)[:, 1:].reshape(3, 6, 6)
    torch.testing.assert_close(diffmask.mask(images), expected, atol=1e-5, rtol=1e-4)
    single = torch.sigmoid(logits[..., 2] + 0.2 * math.log(5))[:, 1:].reshape(3, 6, 6)
    torch.testing.assert_close(diffmask.mask(images, gate=2, aggregated=False), single, atol=1e-5, rtol=1e-4)
    first3 = torch.sigmoid(logits[..., :3] + 0.2 * math.log(5)).prod(-1)[:, 1:].reshape(3, 6, 6)
    torch.testing.assert_close(diffmask.mask(images, gate=2), first3, atol=1e-5, rtol=1e-4)
    assert diffmask.alpha[3].item() == 23.0
    new = DiffMask.from_original(model, {k.replace("weight_g", "parametrizations.weight.original0")
                                         .replace("weight_v", "parametrizations.weight.original1"): v
                                         for k, v in state.items()})
    torch.testing.assert_close(new.mask(images), expected, atol=1e-5, rtol=1e-4)


_EXECUTED = []


def _not_to_be_called(*args):
    _EXECUTED.append(args)


class _ForeignConfig:  # stands for transformers' ViTConfig in a Lightning checkpoint's hyper-parameters
    def __init__(self):
        self.hidden_size = 64

    def __reduce__(self):
        return _not_to_be_called, ("side effect",)


def test_lightning_checkpoint_loads_without_running_its_code(model, images, tmp_path):
    state = original_state()
    torch.save({"state_dict": state, "hyper_parameters": {"model_cfg": _ForeignConfig(), "mul_activation": 10.0},
                "pytorch-lightning_version": "1.6.3"}, tmp_path / "diffmask.ckpt")
    diffmask = DiffMask.from_original(model, tmp_path / "diffmask.ckpt")
    assert _EXECUTED == []
    logits = independent_logits(model, images, state, mul=10.0)  # the checkpoint's mul_activation is used
    expected = torch.sigmoid(logits + 0.2 * math.log(5)).prod(-1)[:, 1:].reshape(3, 6, 6)
    torch.testing.assert_close(diffmask.mask(images), expected, atol=1e-5, rtol=1e-4)


def test_checkpoints_for_another_size_name_both_sizes(model, tmp_path):
    with pytest.raises(ValueError, match=r"d_model 32 .*d_model 64"):
        DiffMask.from_original(model, original_state(d_model=32))
    with pytest.raises(ValueError, match=r"12 blocks.*4 blocks"):
        DiffMask.from_original(model, original_state(n_gates=14))
    DiffMask(tiny_model()).save(tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match=r"d_model 32 and 2 blocks.*d_model 64 and 4 blocks"):
        DiffMask.load(model, tmp_path / "small.safetensors")


def test_model_without_class_token_is_refused():
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                            class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        DiffMask(HookedViT.from_timm(vit))


def test_saved_gates_give_identical_masks_and_serve_the_explain_interface(model, images, tmp_path):
    diffmask = perturbed(model, seed=1)
    diffmask.save(tmp_path / "gates.safetensors")
    loaded = DiffMask.load(model, tmp_path / "gates.safetensors")
    assert torch.equal(loaded.mask(images), diffmask.mask(images))
    assert not torch.equal(loaded.mask(images), DiffMask(model).mask(images))
    method = methods()["diffmask"]
    assert method.resolution == "tokens" and set(method.options) == {"gates", "gate", "aggregated"}
    maps = method.fn(model, images, torch.zeros(3, dtype=torch.long), gates=tmp_path / "gates.safetensors")
    assert torch.equal(maps, diffmask.mask(images))
    with pytest.raises(ValueError, match="gates=PATH"):
        method.fn(model, images, None)
    path = tmp_path / "gates.safetensors"  # the common interface, options passed through
    assert torch.equal(explain(model, images, "diffmask", gates=path), diffmask.mask(images))
    assert torch.equal(explain(model, images, "diffmask", gates=path, gate=2, aggregated=False),
                       diffmask.mask(images, gate=2, aggregated=False))
    with pytest.raises(ValueError, match=r"gate must be in \[-6, 5\]"):
        diffmask.mask(images, gate=6)


def test_a_gates_path_is_loaded_once_per_recording_and_again_when_the_file_changes(tmp_path, monkeypatch):
    import gc
    import weakref

    from analyses import explain as explain_module
    from tests.helpers.tiny import SyntheticImages, tiny_model

    model, data = tiny_model(seed=3), SyntheticImages(12, seed=3)
    images = data.images
    path = tmp_path / "gates.safetensors"
    perturbed(model, seed=2).save(path)
    expected = DiffMask.load(model, path).mask(images)  # loaded plainly, before any cache
    load, loads = DiffMask.load, []
    monkeypatch.setattr(DiffMask, "load", classmethod(lambda cls, *a: loads.append(a[1]) or load(*a)))
    explain_module.run(model, data, "diffmask", tmp_path / "maps", options={"diffmask": {"gates": str(path)}},
                       batch_size=4, progress=False)  # 3 batches
    with vitlens.ActivationStore(tmp_path / "maps") as store:
        stored = torch.from_numpy(store["map.diffmask"][:])
    assert len(loads) == 1 and torch.equal(stored, expected)  # one read of the file, the same maps bit for bit
    assert torch.equal(explain(model, images[:5], "diffmask", gates=path), expected[:5]) and len(loads) == 1
    perturbed(model, seed=4).save(path)  # rewritten on disk: never the stale gates
    changed = explain(model, images, "diffmask", gates=path)
    assert len(loads) == 2 and torch.equal(changed, load(model, path).mask(images))
    assert not torch.equal(changed, expected)
    assert torch.equal(explain(model, images, "diffmask", gates=perturbed(model, seed=2)), expected)  # an object
    dead = weakref.ref(model)
    del model
    gc.collect()
    assert dead() is None  # the cached gates do not keep the model alive


def replayed_gates(logits: torch.Tensor) -> torch.Tensor:
    """Hard-concrete samples [batch pos k] from the next torch.rand draw, written out plainly (§B4): a binary
    concrete of temperature 0.2 stretched to (-0.2, 1) and clamped to [0, 1]."""
    u = torch.rand(logits.shape).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + logits) / 0.2)
    return (-0.2 + 1.2 * s).clamp(0, 1)


def plainly_masked_logits(model: HookedViT, images, gate: torch.Tensor, placeholder: torch.Tensor) -> torch.Tensor:
    """timm's own forward with patch embeddings mixed with the placeholder by `gate` [batch patches]."""
    vit = model.vit
    g = gate[..., None]
    x = vit.patch_embed(images) * g + placeholder * (1 - g)
    return vit.forward_head(vit.norm(vit.blocks(vit.norm_pre(vit._pos_embed(x)))))


def test_forward_multiplies_stretched_concrete_samples_of_the_first_gates(model, images):
    state = original_state(seed=4)
    diffmask = DiffMask.from_original(model, state, mul_activation=1.0)  # logits within 1 of N(0, 1): not saturated
    logits = independent_logits(model, images, state, mul=1.0)[..., :3]  # gates 0..2
    torch.manual_seed(5)
    out = diffmask(images, 2)
    torch.manual_seed(5)
    z = replayed_gates(logits)
    product = z[..., 0] * z[..., 1] * z[..., 2]
    assert out.layer == 2 and 0.05 < (z == 0).float().mean() < 0.95  # gates are exactly 0 with some probability
    torch.testing.assert_close(out.gates, product, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.gates_full[..., 1], z[..., 0] * z[..., 1], atol=1e-5, rtol=1e-4)
    log_keep = torch.nn.functional.logsigmoid(logits + 0.2 * math.log(5))
    torch.testing.assert_close(out.expected_L0, log_keep.sum(-1), atol=1e-5, rtol=1e-4)
    expected = plainly_masked_logits(model, images, product[:, 1:], state["gate.placeholder"])
    torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits_orig, model.vit(images))


def test_training_loss_is_alpha_times_kl_to_the_original_minus_eps_plus_the_log_l0(model, images):
    state = original_state(seed=6)
    diffmask = DiffMask.from_original(model, state, mul_activation=1.0)
    trainer = Trainer(diffmask, eps=0.07)
    torch.manual_seed(11)
    first = trainer.step(images)[0]
    torch.manual_seed(11)
    layer = int(torch.randint(6, ()))  # a layer drawn uniformly, then its gates sampled
    logits = independent_logits(model, images, state, mul=1.0)[..., :layer + 1]
    keep = replayed_gates(logits).prod(-1)
    with torch.no_grad():
        p, q = model.vit(images).log_softmax(-1), plainly_masked_logits(model, images, keep[:, 1:],
                                                                        state["gate.placeholder"]).log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)  # KL(original || masked)
    l0 = torch.nn.functional.logsigmoid(logits + 0.2 * math.log(5)).sum(-1).mean(-1)  # all 37 positions, CLS too
    assert first["layer"] == layer
    assert first["kl"] == pytest.approx(kl.mean().item(), rel=1e-4, abs=1e-6)
    alpha = 20.0 + layer  # original_state's alpha.{i}
    assert first["loss"] == pytest.approx((alpha * (kl - 0.07) + l0).mean().item(), rel=1e-4, abs=1e-5)


# -- training ---------------------------------------------------------------------------------------------

def test_l0_falls_during_a_short_run_on_the_scenes(model, scenes):
    images = torch.stack([scenes[i]["image"] for i in range(0, len(scenes), 4)])

    def expected_l0(diffmask) -> float:  # mean over gates k of P(prod_{i<=k} z_i != 0), deterministic
        return sum(diffmask.mask(images, gate=k).mean().item() for k in range(diffmask.n_gates)) / diffmask.n_gates

    torch.manual_seed(0)  # the gates' initialisation (train seeds its own sampling)
    diffmask = DiffMask(model)
    start = expected_l0(diffmask)
    before = {name: t.clone() for name, t in model.vit.state_dict().items()}
    model.vit.zero_grad(set_to_none=True)  # tests calling Trainer.step directly leave gradients
    log = train(diffmask, scenes, max_steps=30, epochs=10, batch_size=8, lr=1e-2, lr_placeholder=1e-2, warmup=5,
                progress=False)
    assert (log.phase == "gates").sum() == 30 and (log.phase == "alpha").sum() == 30
    assert diffmask.running_steps.sum() == 60  # two objective evaluations per batch, one per optimiser
    assert all(torch.equal(before[name], t) for name, t in model.vit.state_dict().items())  # the ViT is frozen
    assert all(p.grad is None for p in model.vit.parameters())  # no gradient was even computed for it
    assert expected_l0(diffmask) < start - 0.2, (start, expected_l0(diffmask))
    assert all(p.requires_grad for p in model.vit.parameters())  # restored after training


@pytest.mark.parametrize("compat", [False, True])
def test_alpha_rises_while_the_constraint_is_violated_unless_compat(model, images, compat):
    for eps, violated in ((0.0, True), (50.0, False)):  # KL > 0 = eps always; KL < 50 always
        torch.manual_seed(0)
        diffmask = perturbed(model)
        trainer = Trainer(diffmask, eps=eps, compat=compat)
        logs = [log for _ in range(4) for log in trainer.step(images)]
        moved = {log["layer"] for log in logs if log["phase"] == "alpha"}
        alphas = torch.stack([a.detach() for a in diffmask.alpha])
        rises = violated != compat  # intended ascent; the original's descent goes the other way
        for layer in moved:
            assert (alphas[layer] > 20.0) if rises else (alphas[layer] < 20.0), (eps, compat, layer)
        assert all(alphas[i] == 20.0 for i in range(6) if i not in moved)


@pytest.mark.parametrize("compat, bound", [(False, 200.0), (True, 0.0)])
def test_alpha_is_clipped_to_0_200(model, images, compat, bound):
    torch.manual_seed(0)
    diffmask = perturbed(model)
    trainer = Trainer(diffmask, eps=0.0, lr_alpha=500.0, compat=compat)  # one Adam step moves alpha by ~500
    layer = trainer.step(images)[1]["layer"]
    assert diffmask.alpha[layer].item() == bound


def test_optimisers_are_lookahead_adam_with_a_warm_up_from_zero(model, images):
    diffmask = perturbed(model)
    trainer = Trainer(diffmask, lr=1e-2, lr_placeholder=1e-3, warmup=4)
    for optimizer in (trainer.gate_optimizer, trainer.alpha_optimizer):
        group = optimizer.param_groups[0]
        assert (group["lookahead_alpha"], group["lookahead_k"]) == (0.5, 6)
        assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-8, 0)
    assert trainer.alpha_optimizer.param_groups[0]["lr"] == 0.3
    start = [p.detach().clone() for p in diffmask.g_hat.parameters()] + [diffmask.placeholder.detach().clone()]
    trainer.step(images)  # the first gate step has lr 0, as the original's warm-up
    after = list(diffmask.g_hat.parameters()) + [diffmask.placeholder]
    assert all(torch.equal(a, b) for a, b in zip(start, after))
    for k in (1, 2, 3, 4):
        assert [g["lr"] for g in trainer.gate_optimizer.param_groups] == pytest.approx([k / 4 * 1e-2, k / 4 * 1e-3])
        trainer.step(images)
    assert not torch.equal(start[-1], diffmask.placeholder)


def test_layers_are_drawn_uniformly_or_less_often_once_learned(model):
    diffmask = DiffMask(model)
    torch.manual_seed(0)
    counts = torch.bincount(torch.tensor([Trainer(diffmask).sample_layer() for _ in range(3000)]), minlength=6)
    torch.testing.assert_close(counts / 3000., torch.full((6,), 1 / 6), atol=0.03, rtol=0)
    with torch.no_grad():  # layers 0 and 4 learned: accurate, sparse, after 100 steps -> weight 0.1 against 1
        diffmask.running_acc[[0, 4]], diffmask.running_l0[[0, 4]], diffmask.running_steps[[0, 4]] = 0.9, 0.05, 101
        diffmask.running_steps[[1, 2]] = 101  # dense and accurate: still weight 1
    trainer = Trainer(diffmask, weighted_layers=True)
    counts = torch.bincount(torch.tensor([trainer.sample_layer() for _ in range(3000)]), minlength=6)
    expected = torch.tensor([0.1, 1, 1, 1, 0.1, 1]) / 4.2
    torch.testing.assert_close(counts / 3000., expected, atol=0.025, rtol=0)


def test_resumed_training_equals_an_uninterrupted_run(model, scenes, tmp_path):
    options = dict(epochs=2, batch_size=16, lr=1e-2, warmup=3, checkpoint_every=2, progress=False)
    torch.manual_seed(0)
    whole = DiffMask(model)
    log = train(whole, scenes, tmp_path / "whole", max_steps=5, **options)
    torch.manual_seed(0)
    train(DiffMask(model), scenes, tmp_path / "part", max_steps=3, **options)  # interrupted after 3 batches
    torch.manual_seed(99)
    resumed = DiffMask(model)  # its own init is replaced by the checkpoint's state
    log2 = train(resumed, scenes, tmp_path / "part", max_steps=5, **options)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert log2.step.tolist() == log.step.tolist()
    with pytest.raises(ValueError, match="other settings"):
        train(DiffMask(model), scenes, tmp_path / "part", max_steps=6, **{**options, "batch_size": 8})


# -- the toy task -----------------------------------------------------------------------------------------

def test_counting_task_items_count_and_mark_the_red_cells():
    task = CountingTask(60, grid=(2, 3), patch=5, seed=3)
    labels = task.samples.label
    assert labels.min() == 0 and labels.max() == 6
    for i in range(0, 60, 7):
        item = task[i]
        assert item["image"].shape == (3, 10, 15) and item["token_mask"].shape == (2, 3)
        assert item["token_mask"].sum() == item["label"]
        cells = (item["image"] * 0.5 + 0.5)[:, ::5, ::5]  # one pixel per cell, back to [0, 1] colours
        red = (cells == COLOURS[RED].view(3, 1, 1)).all(0)
        assert torch.equal(red.float(), item["token_mask"])
        assert ((cells == 0) | (cells == 1)).all() and not (cells.sum(0) == 0).any() and not (cells.sum(0) == 3).any()


@pytest.mark.slow
def test_trained_masks_select_the_red_cells_of_the_toy_task():
    model = pretrained_toy_vit()
    diffmask = DiffMask(model)
    train(diffmask, CountingTask(512, 3, 4, seed=0), max_steps=120, epochs=10, batch_size=32, lr=1e-2,
          lr_placeholder=1e-2, warmup=10, progress=False)
    held_out = CountingTask(200, 3, 4, seed=1)
    table = run(diffmask, held_out)
    images = torch.stack([held_out[i]["image"] for i in range(200)])
    red = torch.stack([held_out[i]["token_mask"] for i in range(200)])
    masks = diffmask.mask(images)
    torch.testing.assert_close(torch.tensor(table.accuracy.values, dtype=torch.float32),
                               ((masks > 0.5) == (red > 0.5)).float().mean((1, 2)))  # per grid, plainly
    assert table.accuracy.mean() > 0.95
    table = table[table.area > 0]
    # relevance: share of the mask on the red cells; area: their share of the grid
    assert table.relevance.mean() > table.area.mean() + 0.25, table[["relevance", "area"]].mean()
    torch.testing.assert_close(torch.tensor(table.relevance.values, dtype=torch.float32),
                               ((masks * red).sum((1, 2)) / masks.sum((1, 2)))[red.sum((1, 2)) > 0])


# -- HF ViT weights ---------------------------------------------------------------------------------------

def test_hf_vit_state_dict_maps_to_timm_keys():
    d, hf = 8, {}
    hf["vit.embeddings.cls_token"] = torch.randn(1, 1, d)
    hf["vit.embeddings.position_embeddings"] = torch.randn(1, 5, d)
    hf["vit.embeddings.patch_embeddings.projection.weight"] = torch.randn(d, 3, 4, 4)
    hf["vit.embeddings.patch_embeddings.projection.bias"] = torch.randn(d)
    layer = "vit.encoder.layer.0."
    for name, shape in (("layernorm_before", (d,)), ("layernorm_after", (d,)),
                        ("attention.attention.query", (d, d)), ("attention.attention.key", (d, d)),
                        ("attention.attention.value", (d, d)), ("attention.output.dense", (d, d)),
                        ("intermediate.dense", (2 * d, d)), ("output.dense", (d, 2 * d))):
        hf[layer + name + ".weight"] = torch.randn(shape)
        hf[layer + name + ".bias"] = torch.randn(shape[0])
    hf["vit.layernorm.weight"], hf["vit.layernorm.bias"] = torch.randn(d), torch.randn(d)
    hf["classifier.weight"], hf["classifier.bias"] = torch.randn(3, d), torch.randn(3)
    timm_state = hf_vit_to_timm(hf)
    assert torch.equal(timm_state["blocks.0.attn.qkv.weight"][d:2 * d], hf[layer + "attention.attention.key.weight"])
    assert torch.equal(timm_state["blocks.0.attn.qkv.bias"][2 * d:], hf[layer + "attention.attention.value.bias"])
    assert torch.equal(timm_state["blocks.0.mlp.fc2.weight"], hf[layer + "output.dense.weight"])
    assert torch.equal(timm_state["pos_embed"], hf["vit.embeddings.position_embeddings"])
    vit = VisionTransformer(img_size=8, patch_size=4, embed_dim=d, depth=1, num_heads=2, mlp_ratio=2, num_classes=3)
    vit.load_state_dict(timm_state)  # strict: every timm key is covered, nothing left over
    with pytest.raises(KeyError, match="vit.pooler.dense.weight"):
        hf_vit_to_timm({**hf, "vit.pooler.dense.weight": torch.randn(d, d)})


def test_hf_vit_logits_equal_timm_after_the_key_map():
    transformers = pytest.importorskip("transformers")
    from functools import partial

    from analyses.diffmask.original import HF_LAYER_NORM_EPS

    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, num_labels=5)
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(config).eval()
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2,
                            num_classes=5, norm_layer=partial(torch.nn.LayerNorm, eps=HF_LAYER_NORM_EPS)).eval()
    vit.load_state_dict(hf_vit_to_timm(hf.state_dict()))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), hf(pixel_values=x).logits, atol=1e-5, rtol=1e-5)


# -- the command line -------------------------------------------------------------------------------------

def test_train_diffmask_command_writes_gates_and_resumes(tmp_path, capsys):
    from vitlens.cli import main

    out = tmp_path / "gates"
    argv = ["train-diffmask", "--model", "tiny-scenes", "--data", "scenes", "--out", str(out), "--n-per-class", "1",
            "--batch-size", "5", "--max-steps", "2", "--no-progress"]
    assert main(argv) == 0
    log = (out / "log.csv").read_text().splitlines()
    assert len(log) == 1 + 4 and (out / "diffmask.safetensors").exists()
    again = tmp_path / "again"  # --seed also fixes the gates' initialisation: a second run is identical
    assert main(argv[:6] + [str(again)] + argv[7:]) == 0
    assert (again / "diffmask.safetensors").read_bytes() == (out / "diffmask.safetensors").read_bytes()
    assert main(argv[:-3] + ["--max-steps", "3", "--no-progress"]) == 0  # resumes: one more batch
    assert len((out / "log.csv").read_text().splitlines()) == 1 + 6
    capsys.readouterr()
    assert main(argv + ["--epochs", "0"]) == 1
    assert "vitlens: error: --epochs must be at least 1" in capsys.readouterr().err


def test_train_diffmask_on_the_toy_task_from_the_command_line(tmp_path, capsys):
    from vitlens.cli import main

    out = tmp_path / "toy"
    argv = ["train-diffmask", "--model", "toy-count-3x3", "--data", "toy", "--out", str(out), "--n-per-class", "4",
            "--batch-size", "8", "--max-steps", "2", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mask mass on the red cells" in printed and "accuracy" in printed
    assert len((out / "log.csv").read_text().splitlines()) == 1 + 4
    model = pretrained_toy_vit()  # the gates are for the shipped counting ViT, its data the counting task
    gates = DiffMask.load(model, out / "diffmask.safetensors")
    grids = CountingTask(40, model=model, seed=123)  # --n-per-class 4 x 10 counts, --seed's default
    reference = CountingTask(40, 3, 4, seed=123)  # the task's own 0.5/0.5 normalisation, the model's grid
    assert torch.equal(grids[7]["image"], reference[7]["image"])
    images = torch.stack([reference[i]["image"] for i in range(40)])
    with torch.no_grad():  # the shipped ViT counts these grids (it was trained on this normalisation)
        assert (model(images).argmax(-1) == torch.tensor(reference.samples.label)).float().mean() > 0.9
    assert gates.mask(images).shape == (40, 3, 3)


def test_explain_diffmask_from_the_command_line_with_trained_gates(model, tmp_path, capsys):
    from vitlens.cli import main
    from vitlens.data import load_dataset

    out = tmp_path / "gates"
    assert main(["train-diffmask", "--model", "tiny-scenes", "--data", "scenes", "--out", str(out), "--n-per-class",
                 "1", "--batch-size", "5", "--max-steps", "2", "--lr", "1e-2", "--warmup", "1", "--no-progress"]) == 0
    store = tmp_path / "maps"
    argv = ["explain", "--methods", "diffmask", "--gates", str(out / "diffmask.safetensors"), "--store", str(store),
            "--n-per-class", "1", "--no-progress"]
    assert main(argv) == 0
    assert (store / "results" / "explain.csv").exists()
    data = load_dataset("scenes", model=model, n_per_class=1)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    expected = DiffMask.load(model, out / "diffmask.safetensors").mask(images)  # [10 6 6]
    with vitlens.ActivationStore(store) as maps:
        assert list(maps.samples.sample_id) == list(data.samples.sample_id)
        written = torch.from_numpy(maps["map.diffmask"][:]).float()
    torch.testing.assert_close(written.reshape(expected.shape), expected, atol=1e-3, rtol=0)  # as stored
    assert not torch.allclose(expected, DiffMask(model).mask(images))  # the trained gates, not fresh ones
    capsys.readouterr()
    toy = tmp_path / "toy-gates.safetensors"
    DiffMask(pretrained_toy_vit()).save(toy)  # gates for another width and depth
    assert main(argv[:4] + [str(toy)] + argv[5:] + ["--store", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vitlens: error:") and err.count("\n") == 1 and "d_model 32" in err and "d_model 64" in err
