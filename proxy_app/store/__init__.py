"""The analytics store: the peewee models, the background writer and the one CSV format (mirror and export)."""
