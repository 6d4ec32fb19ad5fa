"""Strategies for the mSAM gradient (Behdin et al., 2023, "mSAM: Micro-Batch-Averaged
Sharpness-Aware Minimization", arXiv:2302.09693) beyond the reference loop in ``msam._backward``.

``fused`` and ``batched`` (module ``fused``) run the m micro-batches as one pass of the whole
mini-batch with the rewriting in ``_chunked``; ``graphed`` replays any strategy as one CUDA
graph; ``_common`` holds what every strategy shares.
"""
