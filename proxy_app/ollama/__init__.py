"""Pure knowledge of Ollama's wire formats: what a request asks for (``intake``: fields read by Go's rules in
``gojson``, from bodies read in bounded memory by ``jsonscan``, zstd and forms in ``bodies``), what an answer used
(``usage``) and the error shapes. No Flask, no sockets, no clock, and nothing else of the proxy is imported here.
"""
