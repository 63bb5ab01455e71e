"""Pure knowledge of Ollama's wire formats: what a request asks for (``intake``), what an answer used (``usage``)
and the error shapes. No Flask, no sockets, no clock, and nothing else of the proxy is imported here.
"""
