"""The hot path: every call that is not one of the proxy's own pages goes through here to Ollama and back.

``middleware`` (the WSGI face: which paths are relayed, and the answers), ``forward`` (the relay itself),
``request_body`` (reading the client's body), ``inflight`` (the record of a running call), ``settle`` (the finished
call handed to the sinks), ``headers`` (what crosses the wire), ``upstream`` (connections to Ollama), ``framing``
(reading bodies as they arrive), ``on_loop`` (a stream's body handed to the server's event loop), ``gate``
(concurrency), ``client_watch`` (a client that leaves) and ``drain`` (graceful shutdown). It never imports the
store or the dashboard: finished calls leave through the sinks in the app's state.
"""
