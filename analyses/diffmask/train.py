"""Training DiffMask gates: the constrained objective, Lookahead-Adam, and a resumable plain PyTorch loop.

Objective (Vision-DiffMask §B7): for a layer k drawn per step, ``loss = alpha_k * (KL(p_orig || p_masked) - eps)
+ mean_pos log P(prod_{i<=k} z_i != 0)``, averaged over the batch. The gates and placeholder minimise it
(Lookahead-Adam, lr warm-up); the per-layer Lagrange multipliers alpha_k maximise it (gradient **ascent**, so
alpha_k grows while the mean KL exceeds eps), clipped to [0, 200]. As in the original under PyTorch Lightning
1.x, each batch takes two steps with fresh layer and gate samples, one per optimiser; the frozen ViT's reading
of the batch is shared by both. ``compat=True`` reproduces the original's alpha update, which is gradient
*descent* (its sign flip acted on a stale gradient), so alpha grows while the constraint is met.
"""
from __future__ import annotations

import argparse
import math
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch
from timm.optim import Lookahead
from torch.distributions import Categorical, kl_divergence
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .model import DiffMask

STATE_FILE, GATES_FILE, LOG_FILE = "train_state.pt", "diffmask.safetensors", "log.csv"
TOY_DATA = "toy"  # `--data toy`: the counting task (:mod:`.toy`)
ALPHA_RANGE = (0.0, 200.0)


def lookahead_adam(groups, lr: float) -> Lookahead:
    """Adam (betas 0.9/0.999, eps 1e-8, no weight decay) under Lookahead (alpha 0.5, k 6), as DiffMask."""
    return Lookahead(torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8), alpha=0.5, k=6)


class Trainer:
    """The two DiffMask optimisers and one training step over a batch.

    Args:
        diffmask: the gates (their ViT is frozen by :meth:`step`'s caller, :func:`train`).
        lr, lr_placeholder, lr_alpha: learning rates of the gates, the placeholder and the multipliers.
        eps: the KL tolerance. warmup: linear warm-up steps of the gate optimiser (from 0, as the original).
        weighted_layers: draw layers whose running accuracy > 0.75, keep-probability < 0.1 after 100 steps
            ten times less often (the original's ``--weighted_layer_distribution``).
        compat: the original's alpha update (descent) instead of the intended ascent.
    """

    def __init__(self, diffmask: DiffMask, *, lr: float = 2e-5, lr_placeholder: float = 1e-3, lr_alpha: float = 0.3,
                 eps: float = 0.1, warmup: int = 1200, weighted_layers: bool = False, compat: bool = False):
        self.diffmask, self.eps, self.weighted_layers, self.compat = diffmask, eps, weighted_layers, compat
        groups = [{"params": list(diffmask.g_hat.parameters()), "lr": lr}]
        if isinstance(diffmask.placeholder, torch.nn.Parameter):
            groups.append({"params": [diffmask.placeholder], "lr": lr_placeholder})
        self.gate_optimizer = lookahead_adam(groups, lr)
        self.scheduler = LambdaLR(self.gate_optimizer, lambda step: min(1.0, step / warmup) if warmup > 0 else 1.0)
        self.alpha_optimizer = lookahead_adam(list(diffmask.alpha.parameters()), lr_alpha)

    def sample_layer(self) -> int:
        dm = self.diffmask
        if not self.weighted_layers:
            return int(torch.randint(dm.n_gates, ()))
        done = (dm.running_acc > 0.75) & (dm.running_l0 < 0.1) & (dm.running_steps > 100)
        return int(torch.where(done, 0.1, 1.0).multinomial(1))

    def _objective(self, images: torch.Tensor, read, layer: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(loss_c [batch], loss_g [batch], logged statistics) for one sampled layer."""
        out = self.diffmask(images, layer, read=read)
        kl = kl_divergence(Categorical(logits=out.logits_orig.float()), Categorical(logits=out.logits.float()))
        loss_g = out.expected_L0.float().mean(-1)
        acc = (out.logits.argmax(-1) == out.logits_orig.argmax(-1)).float().mean()
        l0 = out.expected_L0.float().exp().mean()
        dm = self.diffmask
        with torch.no_grad():  # the original's running statistics (buffers), updated on every training call
            dm.running_acc[layer] = dm.running_acc[layer] * 0.9 + acc * 0.1
            dm.running_l0[layer] = dm.running_l0[layer] * 0.9 + l0 * 0.1
            dm.running_steps[layer] += 1
        stats = {"layer": layer, "kl": kl.mean().item(), "loss_g": loss_g.mean().item(), "l0": l0.item(),
                 "acc": acc.item()}
        return kl - self.eps, loss_g, stats

    def step(self, images: torch.Tensor, autocast: bool = False) -> list[dict]:
        """One batch: a gate step and an alpha step, each on a freshly drawn layer; returns their two log rows."""
        dm = self.diffmask
        device_type = images.device.type
        context = torch.autocast(device_type, dtype=torch.bfloat16) if autocast else nullcontext()
        with context:
            read = dm.read(images)
            layer = self.sample_layer()
            loss_c, loss_g, gate_stats = self._objective(images, read, layer)
            loss = (dm.alpha[layer].detach() * loss_c + loss_g).mean()
        loss.backward()
        self.gate_optimizer.step()
        self.scheduler.step()
        self.gate_optimizer.zero_grad(set_to_none=True)

        layer = self.sample_layer()
        with context, torch.no_grad():  # only alpha learns in this step: d loss / d alpha_k = mean(loss_c)
            loss_c, loss_g, alpha_stats = self._objective(images, read, layer)
        (dm.alpha[layer] * loss_c.mean() + loss_g.mean()).backward()
        if not self.compat:
            dm.alpha[layer].grad.neg_()  # ascent: the Lagrangian is maximised over alpha
        self.alpha_optimizer.step()
        self.alpha_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for alpha in dm.alpha:
                alpha.clamp_(*ALPHA_RANGE)
        gate_stats.update(phase="gates", loss=loss.item(), alpha=dm.alpha[gate_stats["layer"]].item())
        alpha_stats.update(phase="alpha", alpha=dm.alpha[layer].item())
        return [gate_stats, alpha_stats]

    def state_dict(self) -> dict:
        return {"gate_optimizer": self.gate_optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "alpha_optimizer": self.alpha_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.gate_optimizer.load_state_dict(state["gate_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])


def train(diffmask: DiffMask, dataset: Dataset, out: str | Path | None = None, *, epochs: int = 1,
          max_steps: int | None = None, batch_size: int = 32, seed: int = 123, checkpoint_every: int = 200,
          num_workers: int = 0, device: str | torch.device | None = None, progress: bool = True,
          **options) -> pd.DataFrame:
    """Train `diffmask` on `dataset` (vitlens items; only "image" is used) and return the step log.

    One row per optimiser step: step, phase ("gates" or "alpha"), layer, kl, loss_g, l0 (mean keep
    probability), acc (masked argmax == original), alpha (after the step), loss. With `out`, writes
    ``out/diffmask.safetensors`` (the gates), ``out/train_state.pt`` (optimisers, RNG, step) and ``out/log.csv``
    every `checkpoint_every` batches and at the end; called again with the same `out`, it resumes where the
    last checkpoint left off. The ViT is frozen during training (its ``requires_grad`` is restored after);
    on a GPU the forward runs under bfloat16 autocast. `options` go to :class:`Trainer`.
    """
    model = diffmask.model
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    diffmask.to(device)
    trainer = Trainer(diffmask, **options)
    per_epoch = math.ceil(len(dataset) / batch_size)
    total = epochs * per_epoch if max_steps is None else min(max_steps, epochs * per_epoch)
    if total <= 0:
        raise ValueError(f"nothing to train: {len(dataset)} images, epochs={epochs}, max_steps={max_steps}")
    out = Path(out) if out is not None else None
    step, rows = 0, []
    if out is not None and (out / STATE_FILE).exists():
        state = torch.load(out / STATE_FILE, map_location=device, weights_only=True)
        if state["options"] != _recorded_options(options, batch_size, seed):
            raise ValueError(f"{out} holds a run with other settings {state['options']}; pass the same settings "
                             "to resume, or another --out")
        diffmask.load_state_dict(state["diffmask"])
        trainer.load_state_dict(state["trainer"])
        torch.set_rng_state(state["rng"].cpu())
        step = int(state["step"])
        rows = pd.read_csv(out / LOG_FILE).to_dict("records") if (out / LOG_FILE).exists() else []
    else:
        torch.manual_seed(seed)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    bar = tqdm(total=total, initial=step, desc="diffmask", disable=not progress)
    try:
        while step < total:
            epoch, first = divmod(step, per_epoch)
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
            loader = DataLoader(Subset(dataset, order[first * batch_size:].tolist()), batch_size=batch_size,
                                num_workers=num_workers)
            for batch in loader:
                logs = trainer.step(batch["image"].to(device), autocast=device.type == "cuda")
                step += 1
                rows += [{"step": step, **log} for log in logs]
                bar.update(1)
                bar.set_postfix(kl=f"{logs[0]['kl']:.3f}", l0=f"{logs[0]['l0']:.3f}", layer=logs[0]["layer"])
                if out is not None and (step % checkpoint_every == 0 or step == total):
                    _checkpoint(out, diffmask, trainer, step, rows, _recorded_options(options, batch_size, seed))
                if step >= total:
                    break
    finally:
        bar.close()
        for p, requires_grad in frozen:
            p.requires_grad_(requires_grad)
    return pd.DataFrame(rows)


def _recorded_options(options: dict, batch_size: int, seed: int) -> dict:
    return {**{k: v for k, v in sorted(options.items())}, "batch_size": batch_size, "seed": seed}


def _checkpoint(out: Path, diffmask: DiffMask, trainer: Trainer, step: int, rows: list, options: dict) -> None:
    """Write the gates, the log, then (atomically) the resume state, which alone decides where a resume starts."""
    out.mkdir(parents=True, exist_ok=True)
    diffmask.save(out / GATES_FILE)
    pd.DataFrame(rows).to_csv(out / LOG_FILE, index=False)
    state = {"diffmask": diffmask.state_dict(), "trainer": trainer.state_dict(), "rng": torch.get_rng_state(),
             "step": step, "options": options}
    torch.save(state, out / f"{STATE_FILE}.tmp")
    (out / f"{STATE_FILE}.tmp").replace(out / STATE_FILE)


def main(args: argparse.Namespace) -> None:
    """``vitlens train-diffmask``: train (or resume) gates for --model on --data into --out."""
    from .evaluate import run
    from .toy import CountingTask

    for flag in ("epochs", "batch_size", "checkpoint_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    model, dataset = _inputs(args)
    torch.manual_seed(args.seed)  # the gates' initialisation, so that a run is reproducible
    diffmask = DiffMask(model, mul_activation=args.mul_activation, add_activation=args.add_activation,
                        placeholder=not args.no_placeholder, alpha=args.alpha)
    log = train(diffmask, dataset, args.out, epochs=args.epochs, max_steps=args.max_steps,
                batch_size=args.batch_size, seed=args.seed, checkpoint_every=args.checkpoint_every,
                num_workers=args.num_workers, device=args.device, progress=not args.no_progress, lr=args.lr,
                lr_placeholder=args.lr_placeholder, lr_alpha=args.lr_alpha, eps=args.eps, warmup=args.warmup,
                weighted_layers=args.weighted_layers, compat=args.compat)
    summary = log[log.phase == "gates"].groupby("layer")[["kl", "l0", "acc", "alpha"]].mean()
    print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    if args.data == TOY_DATA:  # the known answer: the mask's share on the red cells against their share
        held_out = run(diffmask, CountingTask(200, model=model, seed=args.seed + 1))
        accuracy = held_out.accuracy.mean()
        held_out = held_out[held_out.area > 0]
        print(f"toy task, 200 held-out grids: mask mass on the red cells {held_out.relevance.mean():.3f}, "
              f"their area {held_out.area.mean():.3f}; mask > 0.5 marks the red cells with accuracy {accuracy:.3f}")
    print(f"gates: {Path(args.out) / GATES_FILE}")


def _inputs(args: argparse.Namespace):
    """(model, dataset) of ``vitlens train-diffmask``: ``--model toy-count-3x3`` is the shipped counting ViT,
    ``--data toy`` the counting task on the model's grid (``--n-per-class`` grids per count, default 1000 in
    all, seeded with ``--seed``); else :func:`vitlens.load_model` and :func:`vitlens.data.load_dataset`."""
    from vitlens.data import load_dataset
    from vitlens.zoo import load_model

    from .toy import TOY_MODEL, CountingTask, pretrained_toy_vit

    model = pretrained_toy_vit() if args.model == TOY_MODEL else load_model(args.model)
    if args.data != TOY_DATA:
        return model, load_dataset(args.data, args.split, model=model, n_per_class=args.n_per_class)
    n = 1000 if args.n_per_class is None else args.n_per_class * (model.layout.n_patches + 1)
    return model, CountingTask(n, model=model, seed=args.seed)
