"""Sampling block: everything between logits and the next token.

* ``params``: ``SamplingParams`` / ``BeamSearchParams`` (vLLM's names, defaults and validation).
* ``batch``: ``SamplingBatch``, per-request tensors built once and updated incrementally.
* ``sampler``: ``Sampler`` (backend ``"torch"`` or ``"triton"``), one pass per step.
* ``ops``: the plain-torch reference ops; ``triton_sample``: the sampling kernel
  (rejection, no threshold), with ``triton_inverse_cdf`` (its top-p rows' draws), ``triton_chunks`` (the chunks a
  top-k row's second pass reads), ``triton_race`` (the exponential race) and ``triton_reject`` (the rare extra
  rounds); ``triton_topk_topp``: the threshold kernel;
  ``triton_search``: their shared searches.
* ``logprobs``: sampled-token and prompt logprobs.
* ``parallel``: ``n > 1`` forking with independent, derivable random streams.
* ``beam_search``: beam state, expansion, HF length penalty and early stopping, fork/free decisions.
"""

from blocks.sample.params import BeamSearchParams, SamplingParams, SamplingType

__all__ = ["SamplingParams", "BeamSearchParams", "SamplingType"]
