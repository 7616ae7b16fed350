"""Multimodal baselines of the paper's Table 1 (VBPR, FREEDOM, LATTICE) on this platform's data,
training loop and full-ranking evaluation, with the paper's graph refinement as a switch."""
