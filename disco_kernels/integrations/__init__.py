"""Framework integrations. Each submodule imports its framework; importing this package imports none.

    disco_kernels.integrations.torchtitan   Scion as torchtitan's optimizer container (needs torchtitan)

The Hugging Face Trainer and PyTorch Lightning need no glue: pass ``dk.Scion`` to them
(``examples/hf_trainer.py``, ``examples/lightning_trainer.py``, README "Frameworks").
"""
