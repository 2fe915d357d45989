"""Drop-in integrations of fastpref's fused losses with other training libraries.

Each submodule imports its library on import, so the libraries stay optional:

- :mod:`fastpref.integrations.trl`: ``FastprefDPOTrainer``, TRL's ``DPOTrainer`` with its loss
  computed from hidden states by fastpref (``pip install "fastpref[trl]"``); and, re-exported
  from :mod:`fastpref.integrations.trl_head`, ``add_fused_lm_head`` (TRL's fused LM head computed
  by fastpref's op) and ``use_fastpref_head`` (TRL's DPO, KTO, GRPO and RLOO trainers on it).
"""
