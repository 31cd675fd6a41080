"""Data: the embedded Fashion-MNIST source (`fashion_mnist`), SEED's TSV format (`tsv`), the
TSV -> WebDataset shard converter (`convert`), shard sets with random access, local or remote
(`shardset`), the order of an epoch across ranks and workers (`order`), the training and
evaluation loaders (`loader`), image decoding (`images`), the augmentation recipes
(`transforms`) and the epoch plan command (`plan`, `python -m seed_core.data plan`).

`open_shards`, `train_loader`, `steps_per_epoch` and `eval_loader` are exported lazily, so a
stage that only writes TSVs does not load (or depend on) the loaders.
"""

from seed_core.lazy import lazy_exports

LAZY_EXPORTS = {
    "ShardSet": "seed_core.data.shardset",
    "open_shards": "seed_core.data.shardset",
    "steps_per_epoch": "seed_core.data.order",
    "train_loader": "seed_core.data.loader",
    "eval_loader": "seed_core.data.loader",
}
__getattr__, __dir__ = lazy_exports(__name__, LAZY_EXPORTS)
