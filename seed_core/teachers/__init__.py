"""Teachers: every known checkpoint layout (`formats`, one module per family), converted strictly
(`convert`, `heads`) to one canonical form (`canonical`), read without running code
(`untrusted`), and verified by kNN against a randomly initialised twin (`verify`).

Canonical form (format `seed_distill`): `X.safetensors` holding `backbone.*` tensors (they load
with `strict=True` into `create_backbone(arch, small_images)`) and `head.*` tensors (the keys of
`build_head(head_layout)`), plus `X.json`, a sidecar with the metadata; the same JSON is stored
in the safetensors header under the key `seed_distill`, so a lone file describes itself:

    {"format": "moco_v2",            # layout of the *source* checkpoint
     "schema": 1,
     "arch": "resnet50", "small_images": false,
     "feature_dim": 2048, "embed_dim": 128,
     "head": true, "head_layout": [["linear", 2048, 2048, true], ["relu"], ...] | null,
     "source_sha256": "...", "source_path": "...",
     "dropped": {"encoder_k.": 320, "queue": 1, ...}}

Source layouts are recognised from the checkpoint's own keys (see `known_formats()`); each has
a small `detect` predicate and an `extract` function returning the backbone and head tensors
with their prefixes removed. Conversion is strict: a key the arch does not expect, a key it
lacks, or a shape that differs is an error naming the keys; nothing is ever loaded partially
(every `load_state_dict` is strict). Heads are rebuilt from their keys and shapes (see
`teachers.heads.infer_head_layout`).

Small-image stems: when `small_images` is not given, a ResNet checkpoint whose `conv1` is 3x3
while the arch's stem is 7x7 is taken as a CIFAR-style stem (3x3 stride 1, no max-pool) and
`small_images: true` is recorded. A stride cannot be read from weights, so deep 3x3 stems and
EfficientNet / MobileNet stems are never auto-detected: pass `small_images=True` for those.

Also: BatchNorm counters (`num_batches_tracked`) missing from old or converted checkpoints are
filled with 0; floating tensors are stored as float32; `argparse.Namespace` (DINO's `args`) is
the only class unpickled beyond torch's weights-only defaults. Known limits: solo-learn's CIFAR
stem pads its 3x3 conv by 2 where ours pads by 1 (same weights, slightly different border
features); heads with weight-normalised or parameter-free layers other than one activation
between layers are not inferred; SEED's EfficientNet students (lukemelas key names) do not map
onto timm's.
"""
