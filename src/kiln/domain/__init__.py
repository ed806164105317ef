"""The rules of Kiln's resources, one module per resource. No HTTP here."""
