"""Settings, database, domain services and storage shared by the API and the workers (no torch here)."""
