"""In-memory twins and fake platform servers for tests."""
