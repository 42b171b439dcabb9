"""``vitlens demo``: every analysis of the toolkit on the bundled default, end to end, into one HTML report.

The bundled ``tiny-scenes`` model over the bundled scene set (generated on first use): the class-embedding
recording and its random twin, the study's measures, attention and context perturbations, key-value memories,
linear probes, class-embedding saliency and its token-removal curves, a short DiffMask training, every
explanation method's maps, the faithfulness and localisation benchmark, and ``report.html``. Each step keeps
its result in the output folder and is skipped when it is there, so a second run only re-renders the report.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

MODEL = "tiny-scenes"
EXPLAIN_METHODS = ("rollout", "grad_rollout", "chefer", "vit_cx", "class_embedding", "diffmask")


class _Steps:
    """Runs the demo's steps in order, each skipped when its result exists, and times them."""

    def __init__(self, progress: bool):
        self.rows: list[dict] = []
        self.progress = progress

    def __call__(self, name: str, done: bool, work) -> None:
        start = time.perf_counter()
        if not done:
            if self.progress:
                print(f"[demo] {name} ...", flush=True)
            work()
        self.rows.append({"step": name, "seconds": round(time.perf_counter() - start, 1),
                          "status": "reused" if done else "computed"})


def _tables(folder: Path, tables: dict[str, pd.DataFrame]) -> None:
    results = folder / "results"
    results.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.to_csv(results / f"{name}.csv", index=False)


def run_demo(out: str | Path = "cache/demo", *, device=None, n_per_class: int = 20, bench_per_class: int = 5,
             diffmask_steps: int = 300, progress: bool = True) -> tuple[Path, pd.DataFrame]:
    """Run the whole pipeline into `out`; returns the report's path and a per-step table (step, seconds, status).

    `n_per_class` scenes of each of the 10 classes are analysed (the probes train on the first 10 of each
    class, so at least 11); the explanation maps and their benchmark use the first `bench_per_class` of each;
    `diffmask_steps` training steps for the DiffMask gates.
    """
    import torch

    import vitlens
    from analyses import class_embedding, explain, faithfulness, memories, perturbation, probing, saliency
    from analyses.diffmask import DiffMask, train
    from vitlens.data import load_dataset
    from vitlens.report import write_report

    if n_per_class < 11:
        raise ValueError(f"n_per_class={n_per_class}: the probes train on 10 scenes of each class and test on the "
                         "rest; pass --n-per-class 11 or more")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps = _Steps(progress)
    model = vitlens.load_model(MODEL).to(device)
    data = load_dataset("scenes", model=model, mask_resize="area", n_per_class=n_per_class)
    # The maps and their benchmark (about 40 forwards per image and method) run on the first scenes of each class.
    bench_data = load_dataset("scenes", model=model, mask_resize="area", n_per_class=min(bench_per_class, n_per_class))
    recording, maps, gates = out / "class_embedding", out / "maps", out / "diffmask"
    results = recording / "results"

    def identifiability():
        store = class_embedding.run(model, data, recording, random_twin=True, device=device, progress=progress)
        with store:
            _tables(recording, {
                "identifiability": class_embedding.identifiability(store),
                "compare_to_random": class_embedding.compare_to_random(store, class_embedding.random_twin_path(recording)),
                "change_rate": class_embedding.change_rate(store),
                "class_similarity_change": class_embedding.class_similarity_change(store),
                "residual_composition": class_embedding.residual_composition(store),
                **{f"context_difference_{m}": class_embedding.context_difference(store, data, measure=m)
                   for m in class_embedding.CONTEXT_MEASURES}})

    steps("class-embedding projection and measures", (results / "residual_composition.csv").exists(),
          identifiability)
    steps("attention patterns", (out / "attention" / "store.json").exists() and vitlens.ActivationStore(
        out / "attention").done.all(), lambda: vitlens.record(
        model, data, out / "attention", hooks={"blocks.*.attn.hook_pattern": "all"}, device=device,
        progress=progress).close())

    def perturbations():
        _tables(recording, {
            "attention_perturbation": pd.concat(
                [perturbation.run(model, data, kind, store=perturbation.store_path(recording, kind), device=device)
                 for kind in ("self_only", "no_cls")], ignore_index=True),
            "context_perturbation": pd.concat(
                [perturbation.run(model, data, kind, store=perturbation.store_path(recording, kind), device=device)
                 for kind in ("context", "class_label")], ignore_index=True)})

    steps("attention and context perturbation", (results / "context_perturbation.csv").exists(), perturbations)
    steps("key-value memories", (results / "memories.csv").exists(), lambda: _tables(
        recording, {"memories": memories.run(model, data, out / "memories", device=device, progress=progress)}))

    def probes():
        train_rows, test_rows = probing.split_per_class(data, 10)
        _tables(recording, {"probes": probing.run(model, train_rows, test_rows, device=device)})

    steps("linear probes", (results / "probes.csv").exists(), probes)

    def removal():
        curves, aucs = saliency.run(model, data, out / "saliency", device=device, progress=progress)
        _tables(recording, {"token_removal_curves": curves, "perturbation_auc": aucs})

    steps("class-embedding saliency and token-removal curves", (results / "perturbation_auc.csv").exists(), removal)
    steps("DiffMask training", (gates / "diffmask.safetensors").exists(), lambda: train(
        DiffMask(model), data, gates, epochs=diffmask_steps, max_steps=diffmask_steps, device=device,
        progress=progress))
    steps("explanation maps", (maps / "store.json").exists() and vitlens.ActivationStore(maps).done.all(),
          lambda: explain.run(model, bench_data, EXPLAIN_METHODS, maps, device=device, progress=progress,
                              options={"diffmask": {"gates": str(gates / "diffmask.safetensors")}}))
    steps("faithfulness and localisation benchmark", (maps / "results" / "evaluate_summary.csv").exists(),
          lambda: faithfulness.evaluate(maps, bench_data, model=model, device=device, progress=progress))
    report: list[Path] = []
    steps("report", False, lambda: report.append(write_report(out, data=data,
                                                              title="vitlens demo: tiny-scenes on the scene set")))
    return report[0], pd.DataFrame(steps.rows)


def summary(out: str | Path) -> pd.DataFrame:
    """The demo's headline numbers, read back from its tables (metric, value)."""
    results = Path(out) / "class_embedding" / "results"
    rows = []
    ident = pd.read_csv(results / "identifiability.csv")
    last = ident[ident.layer == ident.layer.max()]
    for tokens, row in last.set_index("tokens").iterrows():
        rows.append((f"identifiability rate at the last layer, {tokens} tokens (%)", row["rate"]))
    for name in ("attention_perturbation", "context_perturbation"):
        for _, row in pd.read_csv(results / f"{name}.csv").iterrows():
            rows.append((f"{row['kind']}: rate / reference (%)", f"{row['rate']:.1f} / {row['reference_rate']:.1f}"))
    aucs = pd.read_csv(results / "perturbation_auc.csv")
    for _, row in aucs.iterrows():
        rows.append((f"token removal AUC, {row['method']} ({row['order']})", row["auc_study"]))
    return pd.DataFrame(rows, columns=["metric", "value"])


def cli(args) -> None:
    """``vitlens demo``."""
    report, steps = run_demo(args.out, device=args.device, n_per_class=args.n_per_class,
                             diffmask_steps=args.diffmask_steps, progress=not args.no_progress)
    print(steps.to_string(index=False))
    print()
    print(summary(args.out).to_string(index=False))
    print(f"\nreport: {report}")
