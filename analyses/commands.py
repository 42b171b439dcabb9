"""What the analyses offer the ``vitlens`` command line and report, declared without importing them.

This module is imported by ``vitlens --help``, so it imports neither torch nor the analyses: each command
names its arguments here and its ``"module:function"`` target, which is imported only when it runs
(see :mod:`vitlens.registry`). One block per analysis module.
"""
from __future__ import annotations

from vitlens import registry

# --- flags shared by the commands below ---------------------------------------------------------------------


def _study_inputs(parser, *, store: str, compat: str, data: str = "'scenes' (default) or an ImageNet-S root") -> None:
    """--model (default tiny-scenes), --data (default scenes), --store (required) and --compat."""
    parser.add_argument("--model", default="tiny-scenes", help="a model name for vitlens.load_model (default "
                                                               "tiny-scenes)")
    parser.add_argument("--data", default="scenes", help=data)
    parser.add_argument("--store", required=True, help=store)
    parser.add_argument("--compat", action="store_true", help=compat)


def _run_arguments(parser, *, batch_size: int, split: bool = True) -> None:
    """The flags of every dataset-scale run: --split (ImageNet-S), --n-per-class, --batch-size, --device and
    --no-progress."""
    if split:
        parser.add_argument("--split", default="validation", help="dataset split (ImageNet-S)")
    parser.add_argument("--n-per-class", type=int, default=None, help="only the first N images of each class")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--device", default=None, help="default: cuda:$LOCAL_RANK when available, else cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# --- class_embedding -------------------------------------------------------------------------------------
registry.reducer("class_rank", "analyses.class_embedding:ClassRankReducer")


def _study_arguments(parser) -> None:
    """The flags shared by the class-embedding study's commands (identifiability, perturbations)."""
    _study_inputs(parser, store="the store directory; tables go to STORE/results/*.csv",
                  compat="reproduce vit-cls_emb's numbers, bugs included (ties, GAP's first token, comp, mixed "
                         "token sets)")
    parser.add_argument("--mask-resize", choices=("nearest", "area"), default=None,
                        help="token masks: default area for the scenes, nearest (the study's) otherwise")
    _run_arguments(parser, batch_size=32, split=False)
    parser.add_argument("--random-twin", action="store_true", help="also run a seeded random init of the same "
                                                                   "architecture (recorded under STORE-random)")


def _identifiability_arguments(parser) -> None:
    _study_arguments(parser)
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="projection precision (auto: bfloat16 only where the hardware runs it natively)")


registry.command("analyze", "identifiability", "class identifiability of every token at every layer (vit-cls_emb)",
                 "analyses.class_embedding:cli", _identifiability_arguments,
                 description="Record the class-embedding projection (rank, logit, top-5) of the residual, attention "
                             "and MLP outputs of every token at every layer into STORE (resumable), then write "
                             "identifiability, change rate, class-similarity change, residual composition and "
                             "class vs context tables to STORE/results/.")
registry.command("analyze", "attention-perturbation", "identifiability under self_only and no_cls attention",
                 "analyses.perturbation:cli_attention", _study_arguments,
                 description="Run the model with image tokens attending only to themselves (self_only) and without "
                             "attention to CLS (no_cls) in every block; record the last layer's ranks under "
                             "STORE/perturbation/ (resumable) and write STORE/results/attention_perturbation.csv "
                             "(with --random-twin, the random twin's too, in attention_perturbation_random.csv).")
registry.command("analyze", "context-perturbation", "identifiability with the context or the object tokens removed",
                 "analyses.perturbation:cli_context", _study_arguments,
                 description="Keep CLS and the object tokens (context) or CLS and the context tokens (class_label), "
                             "dropped after the position embedding, from the dataset's token masks; record under "
                             "STORE/perturbation/ (resumable) and write STORE/results/context_perturbation.csv "
                             "(with --random-twin, the random twin's too, in context_perturbation_random.csv).")

# --- memories, probing, saliency (analyses/memories.py, probing.py, saliency.py) ---------------------------


def _probes_arguments(parser) -> None:
    _study_arguments(parser)
    parser.add_argument("--hook", default="hook_resid_post", choices=("hook_resid_post", "hook_attn_out", "hook_mlp_out"),
                        help="what is probed at every layer (default the residual stream)")
    parser.add_argument("--train-data", default=None, help="the probes' training set (default: the first "
                                                           "--train-per-class images of each class of --data)")
    parser.add_argument("--train-per-class", type=int, default=10, help="training images per class (default 10, "
                                                                        "the study's 10-shot)")


def _saliency_arguments(parser) -> None:
    _study_arguments(parser)
    parser.add_argument("--methods", default="class_embedding,linear_probe,random,oracle",
                        help="token orderings (default class_embedding,linear_probe,random,oracle)")
    parser.add_argument("--train-per-class", type=int, default=10, help="images per class that train the "
                                                                        "linear-probe ordering (not perturbed)")
    parser.add_argument("--n-perms", type=int, default=10, help="random orderings averaged (default 10)")


registry.command("analyze", "memories", "key-value memories of attention and MLP layers in class space",
                 "analyses.memories:cli", _study_arguments,
                 description="Record each token's top-5 attention and MLP memories and the sub-layers' top-5 "
                             "classes into STORE (resumable), then write the per-layer class-value cosines, "
                             "key-value agreement and composition rates to STORE/results/memories.csv.")
registry.command("analyze", "probes", "linear probes for every layer and token position",
                 "analyses.probing:cli", _probes_arguments,
                 description="Record the probed hook of every layer for the training and test images into "
                             "STORE/probe-train and STORE/probe-test (resumable), fit a ridge probe per layer and "
                             "token (batched) and write STORE/results/probes.csv (accuracy, mean rank).")
registry.command("analyze", "saliency", "token-removal curves of class-embedding saliency and other orderings",
                 "analyses.saliency:cli", _saliency_arguments,
                 description="Keep the top-n patch tokens of each ordering (class-embedding gradients, linear "
                             "probes, random, the true object tokens) and measure accuracy for every n; finished "
                             "curves are kept under STORE/results/curves/; writes the AUC table to "
                             "STORE/results/perturbation_auc.csv and the curves to token_removal_curves.csv.")

# --- report sections (analyses/sections.py) ----------------------------------------------------------------
registry.section("identifiability", "Class identifiability per layer", "analyses.sections:identifiability",
                 requires=("table:identifiability",), command="vitlens analyze identifiability --random-twin", order=10)
registry.section("tokens", "Class identity of every token, layer by layer", "analyses.sections:token_views",
                 requires=("class_rank",), command="vitlens analyze identifiability", order=20)
registry.section("perturbation", "Attention and context perturbation", "analyses.sections:perturbations",
                 requires=("table:attention_perturbation", "table:context_perturbation"),
                 command="vitlens analyze attention-perturbation; vitlens analyze context-perturbation", order=30)
registry.section("memories", "Key-value memories", "analyses.sections:memories", requires=("table:memories",),
                 command="vitlens analyze memories", order=40)
registry.section("probes", "Linear probes against the projection", "analyses.sections:probes",
                 requires=("table:probes",), command="vitlens analyze probes", order=50)
registry.section("token-removal", "Class-embedding saliency: token-removal curves", "analyses.sections:token_removal",
                 requires=("table:token_removal_curves", "table:perturbation_auc"),
                 command="vitlens analyze saliency", order=60)
registry.section("maps", "Explanation maps", "analyses.sections:explanation_maps", requires=("map.*",),
                 command="vitlens explain --methods rollout,chefer,vit_cx", order=70)
registry.section("benchmark", "Faithfulness and localisation benchmark", "analyses.sections:benchmark",
                 requires=("table:evaluate", "table:evaluate_summary"), command="vitlens evaluate STORE --data DATA",
                 order=80)

# --- faithfulness and localisation benchmark (analyses/faithfulness.py, analyses/localisation.py) -----------


def _evaluate_arguments(parser) -> None:
    parser.add_argument("store", help="a store holding map.<method> outputs (vitlens explain)")
    parser.add_argument("--data", required=True, help="the dataset the maps were made on: 'scenes' or an ImageNet-S "
                                                      "root (it needs segmentation masks)")
    parser.add_argument("--model", default=None, help="default: the store's model")
    parser.add_argument("--methods", default=None, help="comma-separated map methods (default every map in the "
                                                        "store); the baselines random, centre and oracle always run")
    parser.add_argument("--metrics", default=None, help="comma-separated metrics (default deletion, insertion, aopc, "
                                                        "road_morf, pointing_game, relevance_mass, relevance_rank, "
                                                        "pixel_accuracy, miou, map; also road_lerf, positive, "
                                                        "negative, token_removal, attribution_localisation, "
                                                        "top_k_intersection, roc_auc)")
    parser.add_argument("--steps", type=int, default=20, help="deletion/insertion steps (default 20)")
    parser.add_argument("--baseline", default="zero", help="what removed patches become: zero, black, mean, blur, "
                                                           "uniform (default zero)")
    _run_arguments(parser, batch_size=16)


registry.command("", "evaluate", "score every explanation map of a store: faithfulness and localisation",
                 "analyses.benchmark:cli", _evaluate_arguments,
                 description="Score the maps of STORE (and the random, centre and oracle baselines) with "
                             "deletion/insertion, AOPC, ROAD, Chefer's perturbation, token removal and the localisation metrics "
                             "against the dataset's masks. Resumable; writes STORE/results/evaluate.csv (per "
                             "image) and evaluate_summary.csv (means with bootstrap 95% intervals, by class and "
                             "mask size) and prints the method x metric table.")

# --- diffmask (analyses/diffmask/) -------------------------------------------------------------------------


def _train_diffmask_arguments(parser) -> None:
    """``vitlens train-diffmask`` options (defaults: the original's CLI)."""
    parser.add_argument("--model", required=True, help="model name for vitlens.load_model (e.g. tiny-scenes)")
    parser.add_argument("--data", required=True, help="'scenes', an ImageNet-S root or a labelled image folder")
    parser.add_argument("--out", required=True, help="directory for diffmask.safetensors, train_state.pt, log.csv")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many batches")
    parser.add_argument("--alpha", type=float, default=20.0, help="initial Lagrange multiplier")
    parser.add_argument("--lr", type=float, default=2e-5, help="gate learning rate")
    parser.add_argument("--lr-placeholder", type=float, default=1e-3)
    parser.add_argument("--lr-alpha", type=float, default=0.3)
    parser.add_argument("--eps", type=float, default=0.1, help="KL tolerance")
    parser.add_argument("--warmup", type=int, default=1200, help="gate learning-rate warm-up steps")
    parser.add_argument("--mul-activation", type=float, default=15.0)
    parser.add_argument("--add-activation", type=float, default=8.0)
    parser.add_argument("--no-placeholder", action="store_true", help="mask with zeros instead of a learned vector")
    parser.add_argument("--weighted-layers", action="store_true", help="draw well-trained layers less often")
    parser.add_argument("--compat", action="store_true", help="the original's alpha update (gradient descent)")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--checkpoint-every", type=int, default=200, help="batches between checkpoints")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    _run_arguments(parser, batch_size=32)


registry.command("", "train-diffmask", "train Vision DiffMask gates for a model on a dataset (resumable)",
                 "analyses.diffmask.train:main", _train_diffmask_arguments,
                 description="Train Vision DiffMask gates (Lookahead-Adam, per-layer Lagrange multipliers) for "
                             "--model on --data, writing OUT/diffmask.safetensors, OUT/train_state.pt and "
                             "OUT/log.csv; running it again resumes. Use the gates with "
                             "`vitlens explain --methods diffmask --gates OUT/diffmask.safetensors`.")

# --- explanation maps (analyses/explain.py, rollout.py, vit_cx.py) -----------------------------------------


def _explain_arguments(parser) -> None:
    _study_inputs(parser, data="'scenes' (default), an ImageNet-S root or an image folder",
                  store="the store directory (maps go to map.<method> outputs; the summary to "
                        "STORE/results/explain.csv)",
                  compat="reproduce the original implementations' numbers, quirks included")
    parser.add_argument("--methods", default="rollout,grad_rollout,chefer,vit_cx",
                        help="comma-separated methods (default rollout,grad_rollout,chefer,vit_cx)")
    parser.add_argument("--option", action="append", default=[], metavar="[METHOD.]NAME=VALUE",
                        help="a method option, e.g. head_fusion=max or rollout.discard_ratio=0.5; repeatable")
    parser.add_argument("--gates", default=None, metavar="PATH", help="DiffMask gates file (the diffmask method's "
                                                                      "gates option)")
    parser.add_argument("--target", choices=("label", "predicted"), default="label",
                        help="explain each image's label (default) or the model's top class")
    _run_arguments(parser, batch_size=16)


registry.command("", "explain", "explanation maps (rollout, gradient rollout, Chefer, ViT-CX, ...) into a store",
                 "analyses.explain:cli", _explain_arguments,
                 description="Compute each method's maps over the dataset into STORE as map.<method> outputs "
                             "(resumable; under torchrun each rank writes its own shards) and write a summary to "
                             "STORE/results/explain.csv. A store holds one set of methods: use another store for others.")

# --- demo (analyses/demo.py) ---------------------------------------------------------------------------------


def _demo_arguments(parser) -> None:
    parser.add_argument("--out", default="cache/demo", help="the output folder (default cache/demo); a second "
                                                           "run reuses what is there")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--n-per-class", type=int, default=20, help="scenes per class (default 20; at least 11)")
    parser.add_argument("--diffmask-steps", type=int, default=300, help="DiffMask training steps (default 300)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


registry.command("", "demo", "run every analysis on the bundled model and scenes and write an HTML report",
                 "analyses.demo:cli", _demo_arguments,
                 description="Run the whole toolkit on the bundled tiny-scenes model and scene set (generated on "
                             "first use): class-embedding projection and identifiability, perturbations, memories, "
                             "probes, saliency, a short DiffMask training, every explanation method, the "
                             "faithfulness benchmark; then write OUT/report.html and print a summary. A second run "
                             "reuses what is there.")
