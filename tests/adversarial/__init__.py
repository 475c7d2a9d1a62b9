"""Adversarial cases (a package, so its conftest and helpers never shadow the suite's own)."""
