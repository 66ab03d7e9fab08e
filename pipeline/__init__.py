"""Ray side of EBSeg-on-Ray: input listing, the labeling pipeline, training loop and curation.

Submodules are imported explicitly (``from pipeline import listing``) so that importing the package
stays cheap and does not pull in Ray or torch.
"""
