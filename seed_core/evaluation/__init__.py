"""Evaluation of frozen representations: feature extraction and feature files (`features`),
weighted kNN (`knn`), linear probes (`linear`), accuracy metrics (`metrics`) and the holdout
split that hyper-parameters are chosen on (`splits`). Pure tensor functions apart from the
feature files; the report reads what these produce, never the reverse.

`knn_classify` is exported lazily, so importing `seed_core.evaluation.features` does not load
the kNN code (and a kNN edit does not re-run the feature stages).
"""

from seed_core.lazy import lazy_exports

LAZY_EXPORTS = {"knn_classify": "seed_core.evaluation.knn"}
__getattr__, __dir__ = lazy_exports(__name__, LAZY_EXPORTS)
