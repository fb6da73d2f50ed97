"""Integrations of epa_ext with training libraries; each submodule imports its library on use.

- ``epa_ext.integrations.trl``: ``EPAConfig`` and ``EPATrainer``, TRL's DPOConfig and DPOTrainer
  on epa_ext's fused-linear losses, with EPA (``loss_type="epa"``).
"""
