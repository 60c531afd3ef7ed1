"""rmsae: preference instability in reward models, detected and mitigated with sparse autoencoders.

A companion library to *Preference Instability in Reward Models: Detection and Mitigation via
Sparse Autoencoders* (arXiv 2605.16339). Heavy dependencies (torch, transformers, SAELens) are
imported by the submodules that need them, so ``import rmsae`` stays cheap.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
