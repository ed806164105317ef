"""Metadata database: ORM models, engines, migrations."""
