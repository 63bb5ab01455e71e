"""WSGI entry point: ``gunicorn -c deploy/gunicorn.conf.py wsgi:app`` or ``waitress-serve wsgi:app``."""

from proxy_app import create_app

app = create_app()
