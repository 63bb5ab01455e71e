"""gunicorn settings for a checkout: ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``.

The settings themselves ship in the package (``proxy_app/service/gunicorn_conf.py``); an installed proxy uses
``gunicorn -c python:proxy_app.service.gunicorn_conf 'proxy_app:create_app()'``, which ``ollama-proxy serve`` runs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy_app.service.gunicorn_conf import *  # noqa: E402,F403
