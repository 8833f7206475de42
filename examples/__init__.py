"""The example configs and the quickstart's sample data, installed as ``rankwise.examples``.

``rankwise init`` writes one of the ``*.yaml`` configs out (by default ``lora.yaml``, every
key with its default); ``data/`` holds the small sample data set the quickstart trains on.
"""
