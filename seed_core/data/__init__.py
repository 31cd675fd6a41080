"""Data: the embedded Fashion-MNIST source (`fashion_mnist`), SEED's TSV format (`tsv`), the
TSV -> WebDataset shard converter (`convert`), the training and evaluation loaders (`loader`)
and the augmentation recipes (`transforms`).

`open_shards`, `train_loader`, `steps_per_epoch` and `eval_loader` are exported lazily, so a
stage that only writes TSVs does not load (or depend on) the loaders.
"""

from seed_core.lazy import lazy_exports

LAZY_EXPORTS = {
    "ShardSet": "seed_core.data.loader",
    "open_shards": "seed_core.data.loader",
    "train_loader": "seed_core.data.loader",
    "steps_per_epoch": "seed_core.data.loader",
    "eval_loader": "seed_core.data.loader",
}
__getattr__, __dir__ = lazy_exports(__name__, LAZY_EXPORTS)
