"""The files an exported model folder carries (``configuration_mohge.py``,
``modeling_mohge.py``): self-contained, importing only torch and transformers, loaded by
``transformers`` with ``trust_remote_code=True``. ``mohge-export-hf`` copies them verbatim."""
