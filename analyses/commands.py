"""What the analyses offer the ``vitlens`` command line and report, declared without importing them.

This module is imported by ``vitlens --help``, so it imports neither torch nor the analyses: each command
names its arguments here and its ``"module:function"`` target, which is imported only when it runs
(see :mod:`vitlens.registry`). One block per analysis module.
"""
from __future__ import annotations

from vitlens import registry

# --- class_embedding -------------------------------------------------------------------------------------
registry.reducer("class_rank", "analyses.class_embedding:ClassRankReducer")

# --- report sections (analyses/sections.py) ----------------------------------------------------------------
registry.section("tokens", "Class identity of every token, layer by layer", "analyses.sections:token_views",
                 requires=("class_rank",), command="vitlens analyze identifiability", order=20)

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
                                                        "pixel_accuracy, miou, map)")
    parser.add_argument("--steps", type=int, default=20, help="deletion/insertion steps (default 20)")
    parser.add_argument("--baseline", default="zero", help="what removed patches become: zero, black, mean, blur, "
                                                           "uniform (default zero)")
    parser.add_argument("--split", default="validation", help="dataset split (ImageNet-S)")
    parser.add_argument("--n-per-class", type=int, default=None, help="only the first N images of each class")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="default: cuda:$LOCAL_RANK when available, else cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


registry.command("", "evaluate", "score every explanation map of a store: faithfulness and localisation",
                 "analyses.faithfulness:cli", _evaluate_arguments,
                 description="Score the maps of STORE (and the random, centre and oracle baselines) with "
                             "deletion/insertion, AOPC, ROAD, Chefer's perturbation and the localisation metrics "
                             "against the dataset's masks. Resumable; writes STORE/results/evaluate.csv (per "
                             "image) and evaluate_summary.csv (means with bootstrap 95% intervals, by class and "
                             "mask size) and prints the method x metric table.")
