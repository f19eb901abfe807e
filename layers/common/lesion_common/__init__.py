"""Code shared by the project's Lambda handlers (deployed as the common layer)."""
