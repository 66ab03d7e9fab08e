"""Ray side of EBSeg-on-Ray: storage helpers, the labeling pipeline, training loop and curation.

Submodules are imported explicitly (``from pipeline import storage``) so that importing the package
stays cheap and does not pull in Ray or torch.
"""
