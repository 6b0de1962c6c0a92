"""Classification metrics for EnECG: accuracy, macro precision / recall / F1 and AUROC, computed with scikit-learn, and
the expected calibration error (scikit-learn has none: 20 lines here).

A local `evaluate` module (`evaluate.load` of Hub metrics needs the network):

    import evaluate
    metric = evaluate.load("enecg_hf/metrics/classification_metrics")
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0],
                   prediction_scores=[[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]], labels=[0, 1])
"""

import warnings

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score


_DESCRIPTION = "Accuracy, macro-averaged precision, recall and F1, and (macro one-vs-rest) AUROC of class predictions."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class indices.
    references (`list` of `int`): true class indices.
    prediction_scores (`list` of `list` of `float`, *optional*): class probabilities, (samples, num_classes), rows
        summing to 1; needed for AUROC.
    labels (`list` of `int`, *optional*): all class indices of the task (default: those seen in references and
        predictions). Macro averages run over them; classes absent from `references` count as 0 recall/F1 only if
        predicted (scikit-learn's `zero_division=0`).

Returns:
    `dict` with `accuracy`, `precision`, `recall`, `f1` (macro) and `auroc`: binary AUROC of the positive class with two
    classes, macro one-vs-rest AUROC over the classes present in `references` otherwise; NaN without scores or with
    fewer than two classes present. `ece`: expected calibration error of the top class (10 equal-width confidence
    bins; the mean over bins of |accuracy - mean confidence|, weighted by the bin's share of samples): how far the
    stated probability of the predicted class is from how often it is right; NaN without scores.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClassificationMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html#classification-metrics"],
        )

    def _compute(self, predictions, references, prediction_scores=None, labels=None):
        if len(predictions) == 0:
            raise ValueError("classification_metrics: no predictions to score")
        references = np.asarray(references)
        predictions = np.asarray(predictions)
        if labels is None:
            labels = sorted(set(references.tolist()) | set(predictions.tolist()))
        labels = list(labels)
        precision, recall, f1, _ = precision_recall_fscore_support(
            references, predictions, labels=labels, average="macro", zero_division=0
        )
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "auroc": _auroc(references, prediction_scores, labels),
            "ece": _expected_calibration_error(references, prediction_scores, labels),
        }


def _expected_calibration_error(references, prediction_scores, labels, bins: int = 10) -> float:
    if prediction_scores is None:
        return float("nan")
    scores = np.asarray(prediction_scores, dtype=np.float64)
    confidence = scores.max(axis=1)
    correct = np.asarray(labels)[scores.argmax(axis=1)] == references
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 cannot occur for a top class.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    error = 0.0
    for b in np.unique(which):
        members = which == b
        error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def _auroc(references, prediction_scores, labels):
    present = sorted(set(references.tolist()))
    if prediction_scores is None or len(present) < 2:
        return float("nan")
    scores = np.asarray(prediction_scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != (len(references), len(labels)):
        raise ValueError(
            f"prediction_scores must have shape (samples, classes) = ({len(references)}, {len(labels)}), "
            f"got {scores.shape}"
        )
    if len(labels) == 2:
        return float(roc_auc_score(references == labels[1], scores[:, 1]))
    # One-vs-rest for each class present in the references (absent classes have no positives: AUROC undefined).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_class = [roc_auc_score(references == label, scores[:, labels.index(label)]) for label in present]
    return float(np.mean(per_class))
