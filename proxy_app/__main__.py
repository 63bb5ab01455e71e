"""``python -m proxy_app serve | run MODEL | check | ...``: see cli.py."""

from proxy_app.service.cli import cli

if __name__ == "__main__":
    cli(prog_name="python -m proxy_app")
