"""Evaluation of frozen representations: feature extraction over ranks (`extract`) and feature
files (`features`), weighted kNN (`knn`), linear probes (`linear`), accuracy metrics (`metrics`),
the holdout split (`splits`) that k, T and the probe's lr are chosen on (`selection`), per-sample
test predictions (`predictions`) and the paired statistics that compare models (`stats`). Pure
functions apart from the files; the report reads what these produce, never the reverse.

`knn_classify` is exported lazily, so importing `seed_core.evaluation.features` does not load
the kNN code (and a kNN edit does not re-run the feature stages).
"""

from seed_core.lazy import lazy_exports

LAZY_EXPORTS = {"knn_classify": "seed_core.evaluation.knn"}
__getattr__, __dir__ = lazy_exports(__name__, LAZY_EXPORTS)
