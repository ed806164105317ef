"""Project file store: one directory per project, each a git working tree."""
