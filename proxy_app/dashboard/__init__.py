"""The ``/analytics`` pages and JSON APIs: views, the read queries and figures, charts and the static script.

It reads the store's models and never writes a call.
"""
