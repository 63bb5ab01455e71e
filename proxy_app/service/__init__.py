"""Running the proxy: the command line, the servers (waitress, gunicorn), and the supervised ``ollama serve``."""
