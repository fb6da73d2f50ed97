"""The preference core: how a batch of preference data is laid out, run through policy and
reference and scored, written once for epa-train (``epa_ext.train``) and EPATrainer
(``epa_ext.integrations.trl``), which only adapt their data and options to it. Framework-free:
it imports torch, transformers' models through ``epa_ext.causal_lm``, and the fused ops.

- ``options``: EPA's options (defaults, help, the one validator both trainers call).
- ``candidates``: candidate-major batches (chosen, K strong, M weak negatives; weak answers from
  dataset rows or from the batch's rows), padded.
- ``packing``: the same batches packed without padding, and the probe that refuses attention that
  does not keep packed sequences apart.
- ``prefix``: the same batches prefix-shared (each prompt once, its candidates after it), and the
  probe that refuses a model whose attention does not honour the shared rows' mask.
- ``scoring``: policy and reference through the decoder, the hidden states gathered back into the
  padded layout; the reference's log-probs.
- ``loss``: DPO / EPA / SFT term / router loss of a batch, and the logged token statistics.
- ``weak_correction``: the weak negatives' importance weights.
"""
