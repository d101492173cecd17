"""The ``dtx`` command line."""
