"""Drop-in integrations of fastpref's fused losses with other training libraries.

Each submodule imports its library on import, so the libraries stay optional:

- :mod:`fastpref.integrations.trl`: ``FastprefDPOTrainer``, TRL's ``DPOTrainer`` with its loss
  computed from hidden states by fastpref (``pip install "fastpref[trl]"``).
"""
