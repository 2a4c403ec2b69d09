"""Console entry points (``mohge-*``); each module's ``main(argv=None)`` is one command."""
