"""Operating the proxy: ``/health``, ``/test``, ``/metrics`` (Prometheus) and the load sampler."""
