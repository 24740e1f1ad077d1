"""The one-sentence captions of the pipeline's saved figures, as the report shows them.

The stages save their figures to ``figures/`` (``figures/<model>/fig1_reliability.png``, ...)
and the report places each one after the code cell that names it (:mod:`calib.site`), numbers it
("Figure 3.") and captions it from :data:`CAPTIONS`, by file name. ``{model}`` in a caption is
the figure's folder (the model it belongs to). A figure missing here is shown with its path
only: the report's browser check (``tests/browser.py``, strict) and
``tests/test_report.py::test_every_pipeline_figure_has_a_caption`` both fail on it, so a new
figure gets its caption when it is added.
"""

from __future__ import annotations

from pathlib import PurePosixPath

#: File name -> caption (one sentence; ``{model}`` is the figure's folder).
CAPTIONS: dict[str, str] = {
    # 00_data
    "examples.png": "Example training images, one column per class.",
    "class_balance.png": "Images per class in each split of the prepared dataset.",
    # 10_train
    "training_curves.png": "Training of {model}: cross-entropy (left) and accuracy (right) per "
                           "epoch on the training and validation splits.",
    "clean_calibration.png": "Clean calibration of {model} on the test set: a reliability "
                             "diagram (bars: accuracy per confidence bin, hatched: the gap to "
                             "the bin's mean confidence, dashed: perfect calibration) and the "
                             "histogram of confidences (dashed: their mean).",
    # 20_attack
    "fig1_reliability.png": "The paper's Fig. 1 for {model}: reliability diagrams of the "
                            "attacked test images before (left column) and after each attack, "
                            "one row per attack setting; bars are the accuracy per confidence "
                            "bin, the hatched red part the gap to the bin's mean confidence and "
                            "the dashed diagonal perfect calibration, with the ECE in each "
                            "corner.",
    "attack_confidence_hist.png": "Confidences of {model} on the attacked images, clean and "
                                  "after each attack of the first setting (dashed: the mean).",
    "attack_curves.png": "ECE (top) and success rate (bottom) of each attack on {model} "
                         "against the per-image query budget, one column per attack setting.",
    # 31_defence_table
    "table4_ece.png": "Table 4 of the paper as a heatmap for {model}: ECE of each defence "
                      "(rows: undefended, post-hoc, then training-time defences) on the clean "
                      "attacked images and after each attack, one panel per attack setting.",
    # 41_sweep_plot
    "fig2_sweeps.png": "The paper's Fig. 2 for {model}: ECE, KS error and average confidence "
                       "after each attack against the L∞ radius eps (sweep) and against the "
                       "query budget (dedicated runs at each budget as markers, one long "
                       "run's trajectory dotted), with the clean level of each run's own "
                       "images as a black line.",
    # 42_detection
    "table2_detection.png": "Table 2 of the paper as a figure for {model}: accuracy (top) and "
                            "AUROC (bottom), with 95% intervals, of the Mahalanobis, LID and "
                            "SpectralDefense detectors against "
                            "ordinary attacks (grey, hatched) and each calibration attack "
                            "(dashed line: chance).",
    # 43_representations
    "representation_shift.png": "Penultimate features and margins of {model} before and after "
                                "each attack over the perturbed images (box plots, whiskers at "
                                "1.5 IQR).",
    "representations.png": "Penultimate features of {model} in the plane of the first two "
                           "principal components of clean training features, with arrows from "
                           "clean to attacked images for each attack.",
    # 44_saliency
    "saliency_similarity.png": "Similarity of the saliency maps of {model} to the clean map "
                               "after each attack, next to two noise baselines of the same L∞ "
                               "size, by three scores.",
    "saliency_examples.png": "Example images and their gradient saliency maps for {model}, "
                             "clean and after each attack, with each map's Spearman "
                             "correlation to the clean one.",
    # 45_models
    "size_comparison.png": "ECE after each black-box attack (top, black tick: clean ECE) and "
                           "attack success rate (bottom) per model, small to large within "
                           "each architecture family.",
    "imbalance.png": "Balanced against long-tailed training, per class from head to tail: "
                     "training images, clean accuracy and confidence, and the success rate "
                     "of UCA and OCA.",
    # 46_seeds
    "seeds.png": "Each training seed of {model}: clean ECE (squares) and ECE after "
                 "the headline attack with its 95% interval over the attacked images (dots), "
                 "the shaded band the range across seeds.",
    # 50_claims
    "mma_bound.png": "ECE and KS error reached by MMA per model and setting, against the clean "
                     "ECE and the theoretical bound 1 − q/K.",
    "perturbations.png": "The first attacked images under Square L∞, Square L2 and PGD L∞ UCA: "
                         "each adversarial image next to its perturbation on one shared colour "
                         "scale, titled with its L∞ and L2 norms.",
}


def caption_for(path: str) -> str | None:
    """The caption of the figure at ``path`` (from the repository root), or None."""
    p = PurePosixPath(path)
    text = CAPTIONS.get(p.name)
    if text is None:
        return None
    return text.replace("{model}", p.parent.name)
