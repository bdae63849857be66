"""Integrations with other libraries (imported on use: fusedlm does not depend on them)."""
