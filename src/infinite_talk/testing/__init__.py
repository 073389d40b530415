"""Test support shipped with the package: the golden-case runner."""
