"""Models: backbones by name (`backbones`), projection heads described by JSON-able layouts
(`heads`), and the encoder that joins them (`encoder`). No I/O here: reading and writing
weights belongs to `seed_core.teachers.canonical`."""
