"""seed_core: the library behind the seed-distill pipeline (SEED, Fang et al., ICLR 2021)."""

__version__ = "0.1.0"
